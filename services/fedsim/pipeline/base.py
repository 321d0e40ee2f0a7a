"""The stage interface: one step of an update's path, with a worker side and an aggregator side.

A stage sees weights and the task they answer, nothing else: not the aggregator's
state, not the task queue, not the rule. Every side is optional (the base passes
its input through), so a stage overrides only where it acts:

- worker: `relabel` before training (data poisoning), `worker` after it (the
  update's weights on their way to the push);
- aggregator: `decode` then `receive` for each update before the rule (outside the
  lock; `decode` also sees the upload's metadata and its base model: a codec),
  `gather` for a round's batch, with the round's base model (what only the whole
  round can undo, e.g. masks; the clip re-check and central DP noise),
  `publish` for the aggregate after the rule.

Its own state (an error-feedback residual, an accountant, a key) is saved as a
rule's is: JSON-friendly `state_dict` and float32 `tensor_state`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import numpy as np

Tensors = Mapping[str, np.ndarray]


class Rejected(ValueError):
    """Weights a stage refuses: `reason` in one line, `tensor` the one at fault if one is;
    `status` the HTTP status an upload gets (422 invalid; 409 its base is gone)."""

    def __init__(self, reason: str, tensor: str | None = None, status: int = 422) -> None:
        self.reason, self.tensor, self.status = reason, tensor, status
        super().__init__(reason)


@dataclass(frozen=True)
class Upload:
    """What the aggregator knows of a received update beside its tensors, for `decode`."""

    meta: Mapping[str, str] = field(default_factory=dict)  # the stages' fields (a codec's name)
    base_version: int = 0
    # The model of base_version, or None when the aggregator no longer has it.
    find_base: Callable[[int], Tensors | None] = lambda version: None

    def base(self) -> Tensors:
        """The model the update was trained from; Rejected (409) when it is gone."""
        found = self.find_base(self.base_version)
        if found is None:
            raise Rejected(
                f"base version {self.base_version} is no longer kept here: a compressed "
                "update cannot be decoded without it; pull the model and train again",
                status=409,
            )
        return found


@dataclass(frozen=True)
class Outgoing:
    """An update on the worker's side: weights trained from `base`, answering `task`."""

    base: Tensors  # w_t, the global weights training started from
    tensors: Tensors  # what will be pushed: w after training, then each stage's change
    task: Mapping[str, Any] = field(default_factory=dict)  # a stage reads its own fields
    meta: Mapping[str, str] = field(default_factory=dict)  # added to the push (a codec's name)

    def delta(self) -> dict[str, np.ndarray]:
        """w - w_t per tensor, float32: the update as the rules' formulas see it."""
        return {
            name: (np.asarray(t, np.float32) - np.asarray(self.base[name], np.float32))
            for name, t in self.tensors.items()
        }


class Stage:
    """One step of the pipeline. Subclass, set `name`, override the sides it acts on."""

    name: ClassVar[str]
    dtypes: frozenset[str] = frozenset()  # safetensors dtypes its uploads use beyond F32
    wants_base: ClassVar[bool] = False  # `decode` needs the base model (recent versions kept)

    @classmethod
    def from_settings(cls, settings: Any) -> Self | None:
        """The stage for these resolved settings, or None when it does not run in them."""
        return cls()

    # --- worker side ------------------------------------------------------------------

    def relabel(self, task: Mapping[str, Any], labels: np.ndarray) -> np.ndarray | None:
        """Labels to train on in place of `labels` (the data set's), or None to keep them."""
        return None

    def worker(self, update: Outgoing) -> Outgoing:
        """The update after this stage, on its way from training to the push."""
        return update

    # --- aggregator side --------------------------------------------------------------

    def decode(self, tensors: Tensors, upload: Upload) -> Tensors:
        """One pushed update's tensors as the stages before it sent them (a codec undone),
        before `receive`; raises Rejected."""
        return tensors

    def receive(self, tensors: Tensors) -> Tensors:
        """One pushed update's weights, checked or decoded; raises Rejected."""
        return tensors

    def gather(self, batch: Sequence[Tensors], base: Tensors, round_no: int) -> Sequence[Tensors]:
        """Round `round_no`'s updates, all trained from `base`, before the rule sees them;
        raises Rejected. The batch keeps its length and order (one entry per update)."""
        return batch

    def publish(self, tensors: Tensors) -> Tensors:
        """The rule's aggregate on its way to being served; raises Rejected."""
        return tensors

    # --- state, saved with the checkpoint like a rule's --------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"stage {self.name} keeps no state, got {', '.join(sorted(state))}")

    def tensor_state(self) -> dict[str, np.ndarray]:
        return {}

    def load_tensor_state(self, tensors: Tensors) -> None:
        if tensors:
            raise ValueError(
                f"stage {self.name} keeps no tensors, got {', '.join(sorted(tensors))}"
            )
