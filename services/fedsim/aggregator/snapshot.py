"""One immutable version of the global model, with its bytes as served.

A new version is a new `Snapshot` swapped in by reference: readers take the
current one without locking, so downloads never wait on uploads and never see a
half-written model.
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

    @classmethod
    def of(cls, tensors: Mapping[str, np.ndarray], version: int, samples: int, model: str):
        """Freeze `tensors` as float32 and encode them once: etag = f"{version}-{sha256[:16]}"."""
        frozen = {}
        for name, tensor in tensors.items():
            tensor = np.ascontiguousarray(tensor, dtype=np.float32)
            tensor.flags.writeable = False  # shared by readers: nobody may change it in place
            frozen[name] = tensor
        body = weights.encode(frozen, {"version": version, "samples": samples, "model": model})
        etag = f"{version}-{hashlib.sha256(body).hexdigest()[:16]}"
        return cls(version, samples, frozen, body, etag)
