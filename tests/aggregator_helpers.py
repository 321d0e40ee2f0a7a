"""Small builders shared by the aggregator tests: checkpoints and uploads without TensorFlow."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

from fedsim import checkpoints, weights
from fedsim.models import SHAPES


def tensors(
    model: str = "mlp", fill: float = 0.0, seed: int | None = None
) -> dict[str, np.ndarray]:
    """Weights of `model`'s layout: all `fill`, or small seeded random values."""
    rng = np.random.default_rng(seed) if seed is not None else None
    return {
        name: (
            rng.standard_normal(shape).astype(np.float32) * 0.01
            if rng is not None
            else np.full(shape, fill, dtype=np.float32)
        )
        for name, shape in SHAPES[model]
    }


def write_v0(model_dir: Path, model: str = "mlp", fill: float = 0.0, **meta: object) -> Path:
    """Checkpoint version 0 as `fedsim.prepare` writes it."""
    return checkpoints.save(
        model_dir, 0, tensors(model, fill), {"samples": 0, "model": model, **meta}, keep=5
    )


def upload(
    fill: float = 1.0,
    *,
    model: str = "mlp",
    client_id: str = "client-1",
    update_id: str | None = None,
    base_version: int = 0,
    num_samples: int = 100,
    tensors_: dict[str, np.ndarray] | None = None,
    **extra: object,
) -> bytes:
    """The body of a POST /v1/updates; `extra` adds or (with None) drops metadata."""
    meta: dict[str, object] = {
        "client_id": client_id,
        "update_id": update_id or uuid.uuid4().hex,
        "base_version": base_version,
        "num_samples": num_samples,
        "slice": 1,
        "slices": "1-4",
        "loss": 0.5,
        "accuracy": 0.9,
    }
    meta.update(extra)
    meta = {k: v for k, v in meta.items() if v is not None}
    return weights.encode(tensors_ if tensors_ is not None else tensors(model, fill), meta)
