"""Checkpoints: `<MODEL_DIR>/ckpt-<version>.safetensors`, written atomically.

Each checkpoint is written to a temporary file in the same folder, fsynced, and
renamed over its final name, so a reader (or a restart after a crash) sees either
the whole file or none of it. `latest` holds the newest file's name. Loading
walks from the newest version down and skips, with a warning, any file that does
not read back whole.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsim import weights

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d+)\.safetensors$")
LATEST = "latest"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    version: int
    tensors: dict[str, np.ndarray]
    metadata: dict[str, str]


def path_for(model_dir: Path, version: int) -> Path:
    return model_dir / f"ckpt-{version}.safetensors"


def versions(model_dir: Path) -> list[int]:
    """Checkpoint versions on disk, newest first."""
    if not model_dir.is_dir():
        return []
    found = (_NAME.match(p.name) for p in model_dir.iterdir())
    return sorted((int(m.group(1)) for m in found if m), reverse=True)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old or the new file, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename itself is durable only once the folder is synced.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(
    model_dir: Path,
    version: int,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, object],
    *,
    keep: int,
) -> Path:
    """Write checkpoint `version`, point `latest` at it, keep the newest `keep`."""
    model_dir.mkdir(parents=True, exist_ok=True)
    path = path_for(model_dir, version)
    write_atomic(path, weights.encode(tensors, {**metadata, "version": version}))
    write_atomic(model_dir / LATEST, (path.name + "\n").encode())
    for old in versions(model_dir)[keep:]:
        path_for(model_dir, old).unlink(missing_ok=True)
    return path


def read(path: Path) -> Checkpoint:
    """One checkpoint file. Raises WeightsError when it does not read back whole."""
    match = _NAME.match(path.name)
    tensors, metadata = weights.decode(path.read_bytes())
    for name, tensor in tensors.items():
        if not np.isfinite(tensor).all():
            raise weights.WeightsError(422, f"tensor {name} contains NaN or infinity")
    try:
        version = int(metadata["version"])
    except (KeyError, ValueError):
        raise weights.WeightsError(422, "metadata has no integer 'version'") from None
    if match and int(match.group(1)) != version:
        raise weights.WeightsError(
            422, f"file name says version {match.group(1)}, metadata says {version}"
        )
    return Checkpoint(path, version, tensors, metadata)


def load_newest(model_dir: Path) -> Checkpoint | None:
    """The newest checkpoint that reads back whole, or None when there is none."""
    for version in versions(model_dir):
        path = path_for(model_dir, version)
        try:
            return read(path)
        except (OSError, weights.WeightsError) as exc:
            log.warning("skipping checkpoint %s: %s", path, exc)
    return None
