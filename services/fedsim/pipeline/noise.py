"""Gaussian noise for differential privacy, shared by the clip stage (local noise, on the
worker) and the dp stage (central noise on a round's mean, on the aggregator).

Shapes follow the model's layout; noise is drawn in float64 and in sorted tensor-name
order, so the same generator gives the same noise whatever order a dict lists them in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedsim.pipeline.base import Tensors


def gaussian(layout: Tensors, std: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """N(0, std^2) per weight of `layout`'s shapes, float64, drawn in sorted name order."""
    drawn = {name: rng.normal(0.0, std, np.shape(layout[name])) for name in sorted(layout)}
    return {name: drawn[name] for name in layout}


def local_noise(
    weights: Tensors, base: Tensors, std: float, rng: np.random.Generator | None = None
) -> dict[str, np.ndarray]:
    """w + N(0, std^2) per weight (DP=local), float64. Without `rng`, drawn from the operating
    system's entropy: nothing the aggregator knows (a task's seed) can redraw it."""
    noise = gaussian(base, std, np.random.default_rng() if rng is None else rng)
    return {n: np.asarray(w, np.float64) + noise[n] for n, w in weights.items()}


def noised_mean(
    batch: Sequence[Tensors], base: Tensors, std: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """w_t + (1/m) sum_k (w_k - w_t) + N(0, std^2) per weight, float32."""
    if not batch:
        raise ValueError("no updates to average")
    out = {}
    noise = gaussian(base, std, rng) if std > 0 else {}
    for name, w_t in base.items():
        w_t64 = np.asarray(w_t, np.float64)
        total = np.zeros(np.shape(w_t), np.float64)
        for tensors in batch:
            total += np.asarray(tensors[name], np.float64) - w_t64
        mean = w_t64 + total / len(batch)
        out[name] = (mean + noise[name] if std > 0 else mean).astype(np.float32)
    return out
