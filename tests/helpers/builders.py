"""What the tests build: stand-in labels and plans, weights, checkpoints, upload bodies and
the tokens file, as `fedsim.prepare` and a worker would make them. No TensorFlow here."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save as st_save

from fedsim import checkpoints, config, tokens, weights
from fedsim.data import partition
from fedsim.models import SHAPES

# Stand-in training labels: digit i % 10 for image i. Plans made from them are real plans
# (the real partition code), without reading MNIST.
LABELS = (np.arange(config.TRAIN_IMAGES) % 10).astype(np.uint8)

# The workers' token the tests write, and one of a hand-started client "typed".
WORKERS_TOKEN = "ab" * 32
TYPED_TOKEN = "cd" * 32


def write_tokens(settings: config.Settings) -> None:
    """TOKENS_FILE with the tests' workers' token and one for a client named "typed"."""
    path = settings.tokens_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        '{"format": 1, "tokens": ['
        f'{{"name": "workers", "token": "{WORKERS_TOKEN}", "clients": ["*"]}},'
        f'{{"name": "typed", "token": "{TYPED_TOKEN}", "clients": ["typed"]}}]}}'
    )
    tokens.read(path)  # the file is valid


def write_plan(settings: config.Settings, labels: np.ndarray = LABELS) -> dict[str, Any]:
    """partitions.json for `settings`, as `fedsim.prepare` writes it (from `labels`)."""
    plan = partition.plan_settings(settings)
    parts = partition.make(plan, labels)
    manifest = partition.manifest(plan, parts, labels)
    settings.model_dir.mkdir(parents=True, exist_ok=True)
    partition.write(settings.model_dir, manifest)
    return manifest


def write_population(settings: config.Settings) -> Path:
    """clients.json for `settings` and its plan's clients, as `fedsim.prepare` writes it."""
    from fedsim.data import population_file
    from fedsim.data.population import Population

    ids = [f"client-{n}" for n in range(1, settings.logical_clients + 1)]
    return population_file.write(settings.model_dir, Population.build(settings, ids))


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


def prepared(tmp_path: Path) -> config.Settings:
    """Default settings on `tmp_path`, with version 0, the plan and the tokens written:
    the MODEL_DIR a real aggregator process starts from."""
    settings = config.load(
        environ={
            "MODEL_DIR": str(tmp_path / "models"),
            "TOKENS_FILE": str(tmp_path / "secrets" / "tokens.json"),
        },
        env_file=tmp_path / "no.env",
    )
    write_v0(settings.model_dir)
    write_plan(settings)
    write_tokens(settings)
    return settings


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


def st_bytes(arrays: dict[str, np.ndarray], **meta: object) -> bytes:
    """safetensors bytes exactly as given (weights.encode would cast to float32)."""
    base = {"client_id": "c", "update_id": "bad", "base_version": "1", "num_samples": "10"}
    return st_save(arrays, metadata={k: str(v) for k, v in {**base, **meta}.items()})
