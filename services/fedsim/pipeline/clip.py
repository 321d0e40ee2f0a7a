"""The clip stage: each update's delta w - w_t bounded to L2 norm DP_CLIP (differential privacy).

A client's update is its delta from the round's model, w - w_t, over all its
tensors at once (the global L2 norm, as in McMahan et al. 2018, "Learning
Differentially Private Recurrent Language Models", ICLR 2018, arXiv:1710.06963).
Clipping scales the delta by min(1, S / ||w - w_t||): a delta within the norm is
unchanged, a longer one keeps its direction and gets norm S.

- worker side: under DP=central with DP_CLIP_AT=worker, and under DP=local, the
  worker clips before the push; under DP=local it then adds its own Gaussian
  noise of std DP_NOISE x DP_CLIP per weight (`noise.local_noise`), drawn from the
  operating system's entropy (not from the task's seed, which the aggregator
  knows), so the aggregator never sees an un-noised update nor can it redraw the noise.
- aggregator side: none here. The re-check needs the round's model, so it runs
  on the round's gather, in the dp stage (`dp.CentralNoise`), which clips every
  update again whatever DP_CLIP_AT says, with the functions of this module.
  Under DP=local the aggregator cannot check a noised update's clip (the noise
  dominates its norm).

Pure numpy, float64 inside.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Self

import numpy as np

from fedsim.pipeline.base import Outgoing, Stage, Tensors
from fedsim.pipeline.noise import local_noise

# An update is "over the norm" when its delta exceeds DP_CLIP by more than this fraction:
# a worker's clipped update, cast to float32 and measured again, differs by rounding only.
SLACK = 0.01


def norm(delta: Tensors) -> float:
    """The global L2 norm of a delta, over all its tensors, in float64."""
    return math.sqrt(sum(float(np.sum(np.square(t, dtype=np.float64))) for t in delta.values()))


def clip(delta: Tensors, bound: float) -> tuple[dict[str, np.ndarray], float]:
    """(delta scaled by min(1, bound / norm), its norm before), float64."""
    if not bound > 0:
        raise ValueError(f"clip norm must be > 0, got {bound!r}")
    before = norm(delta)
    scale = 1.0 if before <= bound else bound / before
    return {n: np.asarray(t, np.float64) * scale for n, t in delta.items()}, before


def delta_of(tensors: Tensors, base: Tensors) -> dict[str, np.ndarray]:
    """w - w_t per tensor, float64."""
    if tensors.keys() != base.keys():
        raise ValueError(
            f"update and base differ in tensors: {sorted(tensors.keys() ^ base.keys())}"
        )
    return {
        n: np.asarray(t, np.float64) - np.asarray(base[n], np.float64) for n, t in tensors.items()
    }


def clipped_weights(tensors: Tensors, base: Tensors, bound: float) -> tuple[dict, float]:
    """(w_t + clip(w - w_t) per tensor in float64, the delta's norm before clipping)."""
    delta, before = clip(delta_of(tensors, base), bound)
    return {n: np.asarray(base[n], np.float64) + d for n, d in delta.items()}, before


class Clip(Stage):
    """Clip on the worker (DP_CLIP_AT=worker, or DP=local); DP=local: then noise."""

    name = "clip"

    def __init__(self, mode: str, bound: float, noise: float, at: str) -> None:
        self.mode, self.bound, self.noise, self.at = mode, bound, noise, at

    @classmethod
    def from_settings(cls, settings: Any) -> Self | None:
        if getattr(settings, "dp", "off") == "off":
            return None
        return cls(settings.dp, settings.dp_clip, settings.dp_noise, settings.dp_clip_at)

    @property
    def clips_on_worker(self) -> bool:
        return self.mode == "local" or self.at == "worker"

    def worker(self, update: Outgoing) -> Outgoing:
        if not self.clips_on_worker:
            return update
        sent, _ = clipped_weights(update.tensors, update.base, self.bound)
        if self.mode == "local":
            sent = local_noise(sent, update.base, self.noise * self.bound)
        out = {n: t.astype(np.float32) for n, t in sent.items()}
        return dataclasses.replace(update, tensors=out)
