"""One immutable version of the global model, with its bytes as served.

A new version is a new `Snapshot` swapped in by reference: readers take the
current one without locking, so downloads never wait on uploads and never see a
half-written model. Under COMPRESSION_DOWN=fp16 it also holds the half-precision
encoding workers train from (`encoded("fp16")`), made once per version like the
float32 bytes, with its own ETag.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedsim import weights


@dataclass(frozen=True)
class Snapshot:
    """One immutable version of the global model, with its bytes as served."""

    version: int
    samples: int
    tensors: Mapping[str, np.ndarray]
    body: bytes
    etag: str  # the version and a digest of the bytes: a restart that re-makes N differs
    fp16: tuple[bytes, str] | None = None  # (body, etag) of the half-precision encoding

    @classmethod
    def of(
        cls,
        tensors: Mapping[str, np.ndarray],
        version: int,
        samples: int,
        model: str,
        down: str = "none",
    ):
        """Freeze `tensors` as float32 and encode them once: etag = f"{version}-{sha256[:16]}";
        with `down` "fp16", the float16 encoding too (its metadata says `encoding`)."""
        frozen = {}
        for name, tensor in tensors.items():
            tensor = np.ascontiguousarray(tensor, dtype=np.float32)
            tensor.flags.writeable = False  # shared by readers: nobody may change it in place
            frozen[name] = tensor
        meta = {"version": version, "samples": samples, "model": model}
        body = weights.encode(frozen, meta)
        half = None
        if down == "fp16":
            small = {name: t.astype(np.float16) for name, t in frozen.items()}
            raw = weights.encode(small, {**meta, "encoding": "fp16"}, wire=True)
            half = raw, _etag(version, raw)
        return cls(version, samples, frozen, body, _etag(version, body), half)

    def encoded(self, encoding: str) -> tuple[bytes, str]:
        """(body, etag) as served in `encoding` ("fp16" when pre-encoded; else float32)."""
        if encoding == "fp16" and self.fp16 is not None:
            return self.fp16
        return self.body, self.etag


def _etag(version: int, body: bytes) -> str:
    return f"{version}-{hashlib.sha256(body).hexdigest()[:16]}"
