"""The attack stage: what a malicious client does, for studying the robust aggregation rules.

The aggregator picks the malicious logical clients (ATTACKERS of them, with
SEED) and names the attack in their tasks: {"kind", "scale", "seed"}. The stage
acts on the worker's side only: `labels_for` before training, `apply` after it;
an honest task (no attack) passes through both unchanged. It runs on every
worker whatever its own ATTACK says, since the task, not the worker's settings,
makes a client an attacker. Everything here is pure numpy.

- label-flip: train on labels permuted by y -> 9 - y (`flip_labels`), a data
  poisoning attack (Tolpegin et al., ESORICS 2020, flip a source class to a
  target; here every class at once, so no label keeps its meaning).
- scaled: send w_t + λ(w - w_t), the honest update boosted λ times (explicit
  boosting, Bhagoji et al., ICML 2019; model replacement, Bagdasaryan et al.,
  AISTATS 2020), so one client outweighs the rest in a mean.
- noise: send Gaussian noise of the model's scale instead of a model: per
  tensor, N(0, s²) with s the standard deviation of that tensor of the base
  model w_t (a tensor that is constant there, e.g. zero biases at the start,
  gets zeros); a Byzantine client that looks plausible by magnitude.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedsim.pipeline.base import Outgoing, Stage, Tensors

__all__ = ["KINDS", "Attack", "apply", "flip_labels", "labels_for", "noise", "scaled"]

KINDS = ("label-flip", "scaled", "noise")  # ATTACK's choices besides "none"
NUM_CLASSES = 10


def flip_labels(labels: np.ndarray) -> np.ndarray:
    """The digits permuted by y -> 9 - y (0<->9, 1<->8, ...; no digit keeps its label)."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers 0-9, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must be integers 0-9, got values {labels.min()}..{labels.max()}")
    return (NUM_CLASSES - 1 - labels).astype(labels.dtype)


def scaled(base: Tensors, trained: Tensors, scale: float) -> dict[str, np.ndarray]:
    """w_t + λ(w - w_t) per tensor: the update w - w_t boosted by λ = `scale` (1: unchanged)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"attack scale must be a finite number, got {scale!r}")
    _same_layout(base, trained)
    out = {}
    for name, w_t in base.items():
        w_t64 = np.asarray(w_t, np.float64)
        out[name] = w_t64 + float(scale) * (np.asarray(trained[name], np.float64) - w_t64)
    return _finite_float32(out, f"scale {scale:g}")


def noise(base: Tensors, seed: int) -> dict[str, np.ndarray]:
    """Per tensor of `base`, seeded N(0, std(tensor)²) noise of its shape, float32.

    Tensors are drawn in sorted name order from one generator seeded with `seed`,
    so the noise depends only on the seed and the layout, not on dict order.
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"attack seed must be an integer >= 0, got {seed!r}")
    rng = np.random.default_rng(int(seed))
    drawn = {}
    for name in sorted(base):
        tensor = np.asarray(base[name], np.float64)
        drawn[name] = rng.normal(0.0, float(tensor.std()), tensor.shape)
    return _finite_float32({name: drawn[name] for name in base}, "noise")


def labels_for(attack: Mapping[str, Any] | None, labels: np.ndarray) -> np.ndarray:
    """The labels a client trains on: flipped for label-flip, else `labels` as given."""
    if _kind(attack) == "label-flip":
        return flip_labels(labels)
    return np.asarray(labels)


def apply(
    attack: Mapping[str, Any] | None, base: Tensors, trained: Tensors
) -> dict[str, np.ndarray]:
    """The weights a client sends after training from `base` to `trained`.

    None (an honest client) and label-flip (its harm is in the labels) send
    `trained`; scaled sends `scaled(base, trained, attack["scale"])`; noise sends
    `noise(base, attack["seed"])`. Always float32 and finite.
    """
    kind = _kind(attack)
    if kind == "scaled":
        assert attack is not None
        if "scale" not in attack:
            raise ValueError("a scaled attack needs a 'scale'")
        return scaled(base, trained, attack["scale"])
    if kind == "noise":
        assert attack is not None
        if "seed" not in attack:
            raise ValueError("a noise attack needs a 'seed'")
        return noise(base, attack["seed"])
    _same_layout(base, trained)
    return _finite_float32(trained, "the trained weights")


class Attack(Stage):
    """Label-flip changes the labels before training; scaled and noise change the weights after."""

    name = "attack"

    def relabel(self, task: Mapping[str, Any], labels: np.ndarray) -> np.ndarray | None:
        attack = task.get("attack")  # only an attacker's tasks carry one
        return labels_for(attack, labels) if attack and _kind(attack) == "label-flip" else None

    def worker(self, update: Outgoing) -> Outgoing:
        # An attacker sends what its attack makes of the honest update from w_t.
        sent = apply(update.task.get("attack"), update.base, update.tensors)
        return dataclasses.replace(update, tensors=sent)


def _kind(attack: Mapping[str, Any] | None) -> str | None:
    if attack is None:
        return None
    if not isinstance(attack, Mapping):
        raise ValueError(f"an attack must be a mapping with a 'kind', got {attack!r}")
    kind = attack.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown attack kind {kind!r}; known: {', '.join(KINDS)}")
    return str(kind)


def _same_layout(base: Tensors, trained: Tensors) -> None:
    if base.keys() != trained.keys():
        raise ValueError(
            f"base and trained weights differ in tensors: {sorted(base.keys() ^ trained.keys())}"
        )
    for name, tensor in base.items():
        if np.shape(tensor) != np.shape(trained[name]):
            raise ValueError(
                f"{name}: base shape {np.shape(tensor)}, trained shape {np.shape(trained[name])}"
            )


def _finite_float32(tensors: Tensors, what: str) -> dict[str, np.ndarray]:
    with np.errstate(over="ignore"):  # an overflow becomes inf, refused below
        out = {name: np.asarray(tensor, dtype=np.float32) for name, tensor in tensors.items()}
    for name, tensor in out.items():
        if not np.isfinite(tensor).all():
            raise ValueError(f"{what} gives non-finite float32 values in {name}")
    return out
