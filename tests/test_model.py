"""The model directory: configuration, start-up errors, and a model change."""

from __future__ import annotations

import numpy as np
import pytest

from dedup import ModelError, ServerConfig, StoreConfig, create_server
from dedup.core.records import Registration
from dedup.face.model_pack import MODEL_DIR_ENV, default_pack_dir, resolve_model_dir
from dedup.gallery.embedded.gallery import EmbeddedGallery


def start(tmp_path, model_dir):
    return create_server(ServerConfig(store=StoreConfig(data_dir=tmp_path / "d"),
                                      model_dir=model_dir))


def test_missing_model_dir_fails_at_start_naming_the_path(tmp_path):
    missing = tmp_path / "no-such-pack"
    with pytest.raises(ModelError, match=str(missing)):
        start(tmp_path, missing)
    assert not (tmp_path / "d").exists()  # nothing was opened


def test_empty_model_dir(tmp_path):
    with pytest.raises(ModelError, match=r"holds no \.onnx files"):
        start(tmp_path, tmp_path)


def test_broken_link_in_model_dir(tmp_path):
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "w600k_mbf.onnx").symlink_to(tmp_path / "gone.onnx")
    with pytest.raises(ModelError, match="broken link"):
        start(tmp_path, pack)


def test_unloadable_model_file(tmp_path):
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "det_500m.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(ModelError, match=f"model directory {pack}: cannot load"):
        start(tmp_path, pack)


def test_model_dir_from_flag_then_environment_then_default(tmp_path, monkeypatch):
    monkeypatch.setenv(MODEL_DIR_ENV, str(tmp_path / "from-env"))
    assert resolve_model_dir(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_model_dir(None) == tmp_path / "from-env"
    monkeypatch.delenv(MODEL_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    pack = resolve_model_dir(None)
    assert pack == default_pack_dir()
    assert sorted(p.name for p in pack.iterdir()) == ["det_500m.onnx", "w600k_mbf.onnx"]
    assert all(p.is_symlink() and p.resolve().is_file() for p in pack.iterdir())


def test_a_model_change_never_compares_old_embeddings(tmp_path, faces):
    config = StoreConfig(data_dir=tmp_path / "d")
    people = faces.persons(3)
    old = EmbeddedGallery(config, model_id="model-old")
    old.insert(Registration("old-1", "ID1"), people[0])
    old.insert(Registration("old-2", "ID2"), people[1])
    old.close()

    new = EmbeddedGallery(config, model_id="model-new")
    try:
        assert len(new.index) == 0
        assert new.stats().registrations_by_model == {"model-old": 2}
        assert new.neighbours(people[0], 10, floor=0.0) == []
        assert new.same_id_number(people[0], "ID1") == []
        new.insert(Registration("new-1", "ID1"), people[2])
        assert [s.registration.registration_id for s in new.neighbours(people[2], 10, 0.0)] == \
            ["new-1"]
        assert new.stats().registrations_by_model == {"model-old": 2, "model-new": 1}
        assert new.get("old-1").embedding_model == "model-old"
    finally:
        new.close()
    # A restart replays or loads model-new only.
    again = EmbeddedGallery(config, model_id="model-new")
    try:
        assert len(again.index) == 1
        results = again.neighbours(np.asarray(people[0]), 10, 0.0)
        assert all(s.registration.embedding_model == "model-new" for s in results)
    finally:
        again.close()
