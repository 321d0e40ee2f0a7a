"""Checkpoints: `<MODEL_DIR>/ckpt-<version>.safetensors`, written atomically, with a checksum.

Each checkpoint is written to a temporary file in the same folder, fsynced, and
renamed over its final name, so a reader (or a restart after a crash) sees either
the whole file or none of it; `remove_temporaries` clears what a kill mid-write
leaves. `latest` holds the newest file's name. Each file's metadata carries a
SHA-256 of its tensors (`checksum`), so a flipped bit is found on reading. Loading
walks from the newest version down and skips, with a warning, any file that does
not read back whole and valid.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsim import weights

log = logging.getLogger(__name__)

LATEST = "latest"
CHECKSUM = "checksum"  # the metadata key
# Canonical decimal, at most 18 digits (< 2**63): `ckpt-007` or `ckpt-٣` is not a checkpoint.
_NAME = re.compile(r"ckpt-(0|[1-9][0-9]{0,17})\.safetensors")
_COUNT = re.compile(r"[0-9]{1,18}")  # version, samples, updates in metadata
_CHECKSUM = re.compile(r"sha256:[0-9a-f]{64}")
# write_atomic's temporary names: tempfile.mkstemp(prefix=".<name>.", suffix=".tmp") puts
# 8 characters from [a-z0-9_] between them.
_TMP_PREFIX, _TMP_SUFFIX = ".", ".tmp"
_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")

_unverified: set[str] = set()  # files already warned about for having no checksum
_unverified_lock = threading.Lock()


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
    found = (_NAME.fullmatch(p.name) for p in model_dir.iterdir())
    return sorted((int(m.group(1)) for m in found if m), reverse=True)


def checksum(tensors: Mapping[str, np.ndarray]) -> str:
    """The checkpoint's `checksum`: "sha256:" and the hex SHA-256 of the tensors as stored.

    The hash runs over each tensor in order of name (Python's string order, i.e. by code
    point), and for each over, in this order:
      - the length of the name's UTF-8 bytes, as an unsigned 64-bit little-endian integer,
      - the name's UTF-8 bytes,
      - the number of dimensions, then each dimension, as unsigned 64-bit little-endian,
      - the values as float32 little-endian, in C (row-major) order.
    Lengths and shapes are framed so that no two different sets of tensors hash the same
    bytes. Metadata is not covered.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = np.asarray(tensors[name], dtype="<f4", order="C")
        raw = name.encode("utf-8")
        digest.update(struct.pack("<Q", len(raw)) + raw)
        digest.update(struct.pack(f"<{tensor.ndim + 1}Q", tensor.ndim, *tensor.shape))
        digest.update(tensor)  # its buffer in place, not a copy (hashlib drops the GIL)
    return "sha256:" + digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old or the new file, never a part."""
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f"{_TMP_PREFIX}{path.name}.", suffix=_TMP_SUFFIX
    )
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


def remove_temporaries(model_dir: Path) -> list[Path]:
    """Delete the temporary files `write_atomic` leaves when killed mid-write; return them.

    Call it when nothing else writes to `model_dir` (at start): a temporary file of a
    write in progress looks the same as an abandoned one.
    """
    if not model_dir.is_dir():
        return []
    removed = []
    for path in sorted(model_dir.iterdir()):
        if not _TEMPORARY.fullmatch(path.name) or (path.is_dir() and not path.is_symlink()):
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        log.info("removed %s, left by an interrupted write", path)
        removed.append(path)
    return removed


def save(
    model_dir: Path,
    version: int,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, object],
    *,
    keep: int,
) -> Path:
    """Write checkpoint `version` with its checksum, point `latest` at it, keep the newest `keep`.

    Refuses (WeightsError, nothing written) what `read` would refuse: non-finite tensors,
    a bad version, samples or updates, a header over weights.MAX_HEADER_BYTES.
    """
    if isinstance(version, bool) or not isinstance(version, int):
        raise weights.WeightsError(422, f"version must be an integer, got {version!r}")
    with np.errstate(over="ignore"):  # a value past float32's range becomes inf, refused below
        stored = {name: np.asarray(t, dtype=np.float32, order="C") for name, t in tensors.items()}
    _check_finite(stored)
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta["version"], meta[CHECKSUM] = str(version), checksum(stored)
    _check_counts(meta)
    body = weights.encode(stored, meta)
    (size,) = struct.unpack("<Q", body[:8])
    if size > weights.MAX_HEADER_BYTES:
        raise weights.WeightsError(
            422,
            f"checkpoint header would be {size} bytes, readers accept {weights.MAX_HEADER_BYTES}",
        )
    model_dir.mkdir(parents=True, exist_ok=True)
    path = path_for(model_dir, version)
    write_atomic(path, body)
    write_atomic(model_dir / LATEST, (path.name + "\n").encode())
    for old in versions(model_dir)[keep:]:
        path_for(model_dir, old).unlink(missing_ok=True)
    return path


def read(path: Path) -> Checkpoint:
    """One checkpoint file, checked for all that a resume relies on.

    Raises WeightsError (or OSError) when the file is not readable safetensors, a tensor
    is not float32 or not finite, the checksum does not match, `version` is not a
    non-negative integer equal to the one in the file name, or `samples` or `updates`
    (when present) is not a non-negative integer of at most 18 digits. A file without
    a checksum (written before checkpoints had one) is read, with a warning once.
    """
    # Checkpoint metadata holds saved update ids: values are bounded by the header alone.
    tensors, metadata = weights.decode(path.read_bytes(), max_value=weights.MAX_HEADER_BYTES)
    version = _check_counts(metadata)
    match = _NAME.fullmatch(path.name)
    if match and int(match.group(1)) != version:
        raise weights.WeightsError(
            422, f"file name says version {match.group(1)}, metadata says {version}"
        )
    _verify_checksum(path, tensors, metadata)
    _check_finite(tensors)
    return Checkpoint(path, version, tensors, metadata)


def load_newest(
    model_dir: Path, check: Callable[[Checkpoint], None] | None = None
) -> Checkpoint | None:
    """The newest checkpoint that reads back whole and valid, or None when there is none.

    Any file that fails to read, whatever the exception, is skipped with a warning and
    the next older one is tried. `check` may refuse a checkpoint that reads well but
    does not fit (e.g. another model's layout) by raising WeightsError: it is skipped too.
    """
    for version in versions(model_dir):
        path = path_for(model_dir, version)
        try:
            ckpt = read(path)
            if check is not None:
                check(ckpt)
        except (OSError, weights.WeightsError) as exc:
            log.warning("skipping checkpoint %s: %s", path, exc)
            continue
        except Exception as exc:  # a file no reader foresaw must not stop a resume
            log.warning("skipping checkpoint %s: %s: %s", path, type(exc).__name__, exc)
            continue
        return ckpt
    return None


def _check_counts(metadata: Mapping[str, str]) -> int:
    """The version; version, samples and updates must be non-negative integers of <= 18 digits."""
    if "version" not in metadata:
        raise weights.WeightsError(422, "metadata has no version")
    for key in ("version", "samples", "updates"):
        value = metadata.get(key)
        if value is not None and not _COUNT.fullmatch(value):
            raise weights.WeightsError(
                422,
                f"metadata {key} must be a non-negative integer of at most 18 digits,"
                f" got {weights.quote(value)}",
            )
    return int(metadata["version"])


def _check_finite(tensors: Mapping[str, np.ndarray]) -> None:
    for name, tensor in tensors.items():
        if not np.isfinite(tensor).all():
            raise weights.WeightsError(422, f"tensor {name} contains NaN or infinity")


def _verify_checksum(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]):
    stated = metadata.get(CHECKSUM)
    if stated is None:
        with _unverified_lock:
            first = str(path) not in _unverified
            _unverified.add(str(path))
        if first:
            log.warning("checkpoint %s has no checksum (an earlier format): not verified", path)
        return
    if not _CHECKSUM.fullmatch(stated):
        raise weights.WeightsError(
            422, f"metadata checksum must be sha256:<64 hex digits>, got {weights.quote(stated)}"
        )
    actual = checksum(tensors)
    if actual != stated:
        raise weights.WeightsError(
            422,
            f"checksum mismatch: metadata says {stated[:23]}..., tensors hash to {actual[:23]}...",
        )


STRATEGY_PREFIX = "strategy/"  # the aggregation rule's tensors (momentum, moments, buffers)


def split(tensors: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(the model's tensors, the rule's tensors without their prefix) of a checkpoint."""
    model = {k: v for k, v in tensors.items() if not k.startswith(STRATEGY_PREFIX)}
    rule = {
        k[len(STRATEGY_PREFIX) :]: v for k, v in tensors.items() if k.startswith(STRATEGY_PREFIX)
    }
    return model, rule
