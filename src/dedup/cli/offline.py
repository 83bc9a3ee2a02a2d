"""Working on an embedded data directory directly, with no server holding it: the options that
ask for it and the ways to open it."""

from __future__ import annotations

import argparse
from pathlib import Path

from dedup.core.settings import IndexConfig, StoreConfig
from dedup.gallery.embedded.data_dir import refuse_unfinished_backup
from dedup.gallery.embedded.gallery import EmbeddedGallery
from dedup.gallery.embedded.layout import store_file
from dedup.gallery.embedded.store import Store


def add_offline_arguments(parser: argparse.ArgumentParser) -> None:
    """--data-dir (and its --model-dir): for commands that otherwise send the work to --server."""
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="work on this data directory directly (no server may hold it) "
                        "instead of sending the work to --server")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="with --data-dir: the model pack the server uses")


def open_offline_gallery(args: argparse.Namespace) -> EmbeddedGallery:
    """The gallery in --data-dir, for the model in --model-dir, with no background work."""
    from dedup.face.embedder import FaceEmbedder
    from dedup.face.model_pack import resolve_model_dir

    # Only the model's id is needed: it says which embeddings the gallery may hold.
    embedder = FaceEmbedder(resolve_model_dir(args.model_dir), workers=1)
    embedder.close()
    return EmbeddedGallery(StoreConfig(data_dir=args.data_dir), embedder.model_id,
                           IndexConfig(index_factory="auto"), background=False)


def open_store_reader(data_dir: Path) -> Store:
    """The store in `data_dir`, read-only; a directory without one is a ValueError."""
    if not store_file(data_dir).exists():
        raise ValueError(f"{data_dir}: no dedup store here")
    refuse_unfinished_backup(data_dir)
    return Store.reader(data_dir)
