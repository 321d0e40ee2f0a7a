"""A model's tensors as one flat vector and back, in sorted name order on both sides, so a
worker and the aggregator lay out masked inputs alike whatever order a dict lists them in."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def flat(tensors: Mapping[str, np.ndarray]) -> np.ndarray:
    """The tensors' values one after another, tensors in sorted name order, dtype kept."""
    return np.concatenate([np.asarray(tensors[name]).ravel() for name in sorted(tensors)])


def unflat(vector: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`vector` cut into the shapes of `like` (sorted name order), in `like`'s order."""
    total = sum(int(np.prod(np.shape(t))) for t in like.values())
    if total != len(vector):
        raise ValueError(f"a vector of {len(vector)} values for a layout of {total}")
    out, at = {}, 0
    for name in sorted(like):
        shape = np.shape(like[name])
        size = int(np.prod(shape))
        out[name] = np.asarray(vector[at : at + size]).reshape(shape)
        at += size
    return {name: out[name] for name in like}
