"""One immutable version of the global model, with its bytes as served.

A new version is a new `Snapshot` swapped in by reference: readers take the
current one without locking, so downloads never wait on uploads and never see a
half-written model. Its bytes (and under COMPRESSION_DOWN=fp16 the half-precision
encoding workers train from) are made on the first download of that version, once,
outside the state's lock: under many uploads most versions are never downloaded, and
encoding and hashing 800 kB per version was a sixth of an upload's CPU.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedsim import weights


@dataclass(frozen=True)
class Snapshot:
    """One immutable version of the global model; its encodings are made when first asked."""

    version: int
    samples: int
    tensors: Mapping[str, np.ndarray]  # float32, read-only: shared by every reader
    model: str
    down: str = "none"  # COMPRESSION_DOWN: "fp16" serves a half-precision encoding too
    _encoded: dict[str, tuple[bytes, str]] = field(default_factory=dict, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def of(
        cls,
        tensors: Mapping[str, np.ndarray],
        version: int,
        samples: int,
        model: str,
        down: str = "none",
    ) -> Snapshot:
        """Freeze `tensors` as float32 (no copy when they are already contiguous float32:
        the caller gives up writing to them)."""
        frozen = {}
        for name, tensor in tensors.items():
            tensor = np.ascontiguousarray(tensor, dtype=np.float32)
            tensor.flags.writeable = False  # shared by readers: nobody may change it in place
            frozen[name] = tensor
        return cls(version, samples, frozen, model, down)

    def encoded(self, encoding: str) -> tuple[bytes, str]:
        """(body, etag) as served in `encoding` ("fp16" under COMPRESSION_DOWN=fp16; else
        float32): safetensors with metadata version, samples and model (and `encoding` for
        fp16); etag = f"{version}-{sha256(body)[:16]}", so a restart that re-makes version N
        from other weights serves another ETag. Made once per version and encoding."""
        wanted = "fp16" if encoding == "fp16" and self.down == "fp16" else "float32"
        found = self._encoded.get(wanted)
        if found is not None:
            return found
        with self._lock:  # two first downloads at once encode it once
            found = self._encoded.get(wanted)
            if found is None:
                found = self._encoded[wanted] = self._encode(wanted)
        return found

    def _encode(self, encoding: str) -> tuple[bytes, str]:
        meta = {"version": self.version, "samples": self.samples, "model": self.model}
        if encoding == "fp16":
            small = {name: t.astype(np.float16) for name, t in self.tensors.items()}
            body = weights.encode(small, {**meta, "encoding": "fp16"}, wire=True)
        else:
            body = weights.encode(self.tensors, meta)
        return body, f"{self.version}-{hashlib.sha256(body).hexdigest()[:16]}"
