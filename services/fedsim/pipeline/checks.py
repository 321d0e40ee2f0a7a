"""The checks the aggregator never trusts a worker for: each update on arrival, the aggregate
before it is served.

- validate: a pushed update has the model's tensor names and shapes, float32, every
  weight finite and |w| <= MAX_WEIGHT. Finite is not enough: two updates of ±3e38
  overflow a mean, and no trained weight comes near 1e6.
- finite: the rule's aggregate is finite and within the same bound, or it is not
  published (the served model stays as it was).

Both raise `Rejected`; the caller decides what it means (uploads: a 422).
"""

from __future__ import annotations

from typing import Any, Self

import numpy as np

from fedsim import weights
from fedsim.pipeline.base import Rejected, Stage, Tensors

MAX_WEIGHT = 1e6  # the largest weight an update or a published model may hold


def within(tensor: np.ndarray) -> bool:
    """Whether every weight is finite and |w| <= MAX_WEIGHT: two reductions, no temporary
    array (a NaN makes min and max NaN, which compares false with the bound, as ±inf
    does). Every upload and every version it makes is checked."""
    if tensor.size == 0:
        return True
    return float(tensor.min()) >= -MAX_WEIGHT and float(tensor.max()) <= MAX_WEIGHT


def check_update(tensors: Tensors, layout: weights.Layout) -> None:
    """Refuse an update that is not the model's layout, float32, finite and bounded."""
    try:
        weights.check_layout(tensors, layout)
    except weights.WeightsError as exc:
        raise Rejected(exc.reason) from None
    ok = {}
    for name, _ in layout:  # the layout's order, as weights.validate names the first
        tensor = tensors[name]
        if tensor.dtype != np.float32:
            raise Rejected(f"tensor {name} is {tensor.dtype}, expected float32")
        ok[name] = within(tensor)
        if not ok[name] and not np.isfinite(tensor).all():
            raise Rejected(f"tensor {name} contains NaN or infinity")
    for name, tensor in tensors.items():
        if not ok[name]:
            peak = float(np.abs(tensor).max())
            raise Rejected(f"tensor {name} holds {peak:.3g}, beyond {MAX_WEIGHT:g}", name)


def publishable(tensors: Tensors) -> None:
    """Refuse global weights with a NaN, an infinity or |w| > MAX_WEIGHT, naming the tensor."""
    for name, tensor in tensors.items():
        if not within(np.asarray(tensor)):
            raise Rejected(f"tensor {name} would be non-finite or beyond {MAX_WEIGHT:g}", name)


class Validate(Stage):
    """Each received update against the layout of MODEL (first on the aggregator's side)."""

    name = "validate"

    def __init__(self, layout: weights.Layout) -> None:
        self.layout = layout

    @classmethod
    def from_settings(cls, settings: Any) -> Self:
        from fedsim.models import SHAPES  # the layouts in plain Python, no TensorFlow

        return cls(SHAPES[settings.model])

    def receive(self, tensors: Tensors) -> Tensors:
        check_update(tensors, self.layout)
        return tensors


class Finite(Stage):
    """The aggregate, after the rule and any noise added to it, before it is published."""

    name = "finite"

    def publish(self, tensors: Tensors) -> Tensors:
        publishable(tensors)
        return tensors
