"""MNIST as IDX files: verify, download, load and scale.

The four standard files may be gzipped (`*.gz`) or plain. Integrity is checked on
the uncompressed bytes with SHA-256, so a gzipped and a plain copy of the same
file pass alike.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

IDX_UBYTE = 0x08  # the only element type MNIST uses


@dataclass(frozen=True)
class IdxFile:
    name: str  # file name without .gz
    sha256: str  # of the uncompressed content
    ndim: int  # 3 for images (n, 28, 28), 1 for labels (n,)


FILES = {
    "train-images": IdxFile(
        "train-images-idx3-ubyte",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        3,
    ),
    "train-labels": IdxFile(
        "train-labels-idx1-ubyte",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        1,
    ),
    "t10k-images": IdxFile(
        "t10k-images-idx3-ubyte",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        3,
    ),
    "t10k-labels": IdxFile(
        "t10k-labels-idx1-ubyte",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        1,
    ),
}


class DataError(RuntimeError):
    """A data file is missing, truncated or corrupt; the message names it."""


def where_to_put(data_dir: Path) -> str:
    names = ", ".join(f.name + ".gz" for f in FILES.values())
    return f"put the four MNIST files ({names}) in {data_dir}"


def locate(data_dir: Path, spec: IdxFile) -> Path | None:
    """The gzipped or plain copy of a file in data_dir, or None."""
    for candidate in (data_dir / (spec.name + ".gz"), data_dir / spec.name):
        if candidate.is_file():
            return candidate
    return None


def read_bytes(path: Path) -> bytes:
    """The uncompressed content of a plain or gzipped file."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc})") from None


def parse_idx(content: bytes, ndim: int, source: str) -> np.ndarray:
    """Parse IDX bytes (magic 0x0000 0x08 ndim, then ndim big-endian sizes, then data)."""
    magic = content[:4]
    expected = bytes((0, 0, IDX_UBYTE, ndim))
    if len(magic) == 4 and magic != expected:
        raise DataError(
            f"{source}: wrong magic number: expected {expected.hex()} "
            f"(unsigned bytes, {ndim} dimensions), found {magic.hex()}"
        )
    if len(content) < 4 + 4 * ndim:
        raise DataError(f"{source}: truncated: {len(content)} bytes, shorter than an IDX header")
    dims = tuple(int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    needed = int(np.prod(dims))
    found = len(content) - offset
    if found != needed:
        what = "truncated" if found < needed else "too long"
        raise DataError(
            f"{source}: {what}: header says {'x'.join(map(str, dims))} = {needed} bytes "
            f"of data, found {found}"
        )
    return np.frombuffer(content, dtype=np.uint8, offset=offset).reshape(dims)


def load_file(data_dir: Path, key: str, *, verify: bool) -> np.ndarray:
    spec = FILES[key]
    path = locate(data_dir, spec)
    if path is None:
        raise DataError(f"missing {spec.name}(.gz) in {data_dir}: {where_to_put(data_dir)}")
    content = read_bytes(path)
    if verify:
        digest = hashlib.sha256(content).hexdigest()
        if digest != spec.sha256:
            raise DataError(
                f"{path}: checksum mismatch: expected SHA-256 {spec.sha256} of the uncompressed "
                f"content, found {digest}; replace the file, or set DATA_VERIFY=false for "
                f"other IDX data"
            )
    return parse_idx(content, spec.ndim, str(path))


def load_pair(data_dir: Path, split: str, *, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 28, 28) uint8 and labels (n,) uint8 of 'train' or 't10k'."""
    images = load_file(data_dir, f"{split}-images", verify=verify)
    labels = load_file(data_dir, f"{split}-labels", verify=verify)
    if len(images) != len(labels):
        raise DataError(f"{data_dir}: {split} has {len(images)} images but {len(labels)} labels")
    return images, labels


def slice_range(index: int, size: int) -> tuple[int, int]:
    """Slice `index` (1-based) is images [start, stop) of the training set."""
    if index < 1:
        raise ValueError(f"slice numbers start at 1, got {index}")
    return (index - 1) * size, index * size


def scale(images: np.ndarray) -> np.ndarray:
    """Pixels to float32 in [0, 1], as the model expects."""
    return images.astype(np.float32) / 255.0


def download(
    data_dir: Path, mirrors: tuple[str, ...], *, verify: bool, timeout: float = 60
) -> None:
    """Fetch every missing file from the first mirror that serves it.

    Each download is checked before it is renamed into place, so a failed or
    corrupt download never leaves a file behind.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    missing = [spec for spec in FILES.values() if locate(data_dir, spec) is None]
    for spec in missing:
        errors = []
        for mirror in mirrors:
            url = mirror + spec.name + ".gz"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    body = response.read()
                content = gzip.decompress(body)
                if verify and hashlib.sha256(content).hexdigest() != spec.sha256:
                    raise DataError("checksum mismatch")
                parse_idx(content, spec.ndim, url)
            except Exception as exc:  # network, gzip or format: try the next mirror
                errors.append(f"{url}: {exc}")
                continue
            fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=".download-")
            with os.fdopen(fd, "wb") as out:
                out.write(body)
            os.replace(tmp, data_dir / (spec.name + ".gz"))
            log.info("downloaded %s", url)
            break
        else:
            raise DataError(
                f"could not download {spec.name}.gz ({'; '.join(errors)}); "
                f"without network, {where_to_put(data_dir)}"
            )


def ensure(data_dir: Path, mirrors: tuple[str, ...], *, verify: bool) -> None:
    """Download what is missing, then check all four files read back whole."""
    if any(locate(data_dir, spec) is None for spec in FILES.values()):
        download(data_dir, mirrors, verify=verify)
    for split in ("train", "t10k"):
        load_pair(data_dir, split, verify=verify)
