"""Model weights on the wire and on disk: safetensors bytes with string metadata.

safetensors stores raw little-endian tensors behind a JSON header: no pickle, so
reading an upload cannot run code, and the header's size is known from its first
8 bytes, so a hostile header is refused before it is parsed.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

Tensors = dict[str, np.ndarray]
Layout = tuple[tuple[str, tuple[int, ...]], ...]

MAX_HEADER_BYTES = 64 * 1024  # the mlp's header is ~0.6 kB, the cnn's ~0.8 kB


class WeightsError(ValueError):
    """Bytes that are not usable weights. `status` is the HTTP status it maps to."""

    def __init__(self, status: int, reason: str) -> None:
        self.status, self.reason = status, reason
        super().__init__(reason)


def encode(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, object]) -> bytes:
    """safetensors bytes; metadata values are stored as strings."""
    return save(
        {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
        metadata={k: str(v) for k, v in metadata.items()},
    )


def read_header(data: bytes) -> dict:
    """The JSON header of safetensors bytes, bounded in size. Raises WeightsError(400)."""
    if len(data) < 8:
        raise WeightsError(400, f"body is {len(data)} bytes, too short for safetensors")
    (size,) = struct.unpack("<Q", data[:8])
    if size > MAX_HEADER_BYTES or size > len(data) - 8:
        raise WeightsError(400, f"safetensors header of {size} bytes is too large or truncated")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(400, f"safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WeightsError(400, "safetensors header is not a JSON object")
    return header


def decode(data: bytes) -> tuple[Tensors, dict[str, str]]:
    """Tensors and metadata from safetensors bytes. Raises WeightsError(400) if unreadable."""
    header = read_header(data)
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise WeightsError(400, "safetensors __metadata__ is not an object")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise WeightsError(400, f"unreadable safetensors: {exc}") from None
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def validate(tensors: Mapping[str, np.ndarray], layout: Layout) -> None:
    """Check names, shapes, dtype and finiteness against a model's layout. Raises WeightsError(422)."""
    expected = dict(layout)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise WeightsError(422, f"wrong tensor names: missing {missing}, unexpected {extra}")
    for name, shape in layout:
        tensor = tensors[name]
        if tensor.dtype != np.float32:
            raise WeightsError(422, f"tensor {name} is {tensor.dtype}, expected float32")
        if tensor.shape != shape:
            raise WeightsError(422, f"tensor {name} has shape {tensor.shape}, expected {shape}")
        if not np.isfinite(tensor).all():
            raise WeightsError(422, f"tensor {name} contains NaN or infinity")


def layout_of(tensors: Mapping[str, np.ndarray]) -> Layout:
    return tuple((name, tuple(t.shape)) for name, t in tensors.items())
