"""The interface every rule implements, and what the aggregator hands it.

A rule turns accepted client updates into the next global weights. It never
touches HTTP, checkpoints, validation or the choice of clients (tasks.py): the
state (state.py) calls it and persists what it returns from `state_dict` (JSON)
and `tensor_state` (float32 tensors, saved beside the model's). `mode` says how
the aggregator runs a rule and what it advertises to workers:

- "async" (`AsyncRule`): one update at a time, `accept(update, current, base)`;
  it returns the next weights, or None while it holds the update (buffering).
- "rounds" (`RoundRule`): the updates of a round at once, `aggregate(current,
  updates)`; sampling, quorum and timeout are the task queue's, the base checks
  only that a round has as many updates as the rule needs.

A rule's setting rows are declared in `registry.py`, beside its name, so the
settings table never imports a rule. A rule refuses impossible combinations in
`check` (a one-line `ConfigError` that says what to change), which
`fedsim.config.load` runs once at start, and builds itself from the checked
settings in `from_settings`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import numpy as np

from fedsim.settings import ConfigError

Tensors = Mapping[str, np.ndarray]


class Refused(Exception):
    """An update that cannot count now (HTTP 409, or `status`). `code` is a short machine word."""

    def __init__(
        self, code: str, reason: str, *, finished: bool = False, status: int = 409
    ) -> None:
        self.code, self.reason, self.finished, self.status = code, reason, finished, status
        super().__init__(reason)


@dataclass(frozen=True)
class Update:
    """One validated client upload."""

    client_id: str
    update_id: str
    base_version: int
    num_samples: int
    tensors: Tensors
    meta: Mapping[str, Any] = field(default_factory=dict)  # slice, loss, accuracy, ...
    task_id: str | None = None  # the task it answers; None for a hand-started client's update
    lease: str = ""


@dataclass(frozen=True)
class Global:
    """The global model as a rule sees it."""

    tensors: Tensors
    version: int
    samples: int  # samples aggregated into `tensors` so far


def value(settings: Any, key: str) -> Any:
    """A resolved setting by its key, e.g. value(settings, "KRUM_F") is settings.krum_f."""
    return getattr(settings, key.lower())


class Strategy:
    """Turns accepted updates into new global weights. Subclass AsyncRule or RoundRule."""

    name: ClassVar[str]
    mode: ClassVar[str]

    @classmethod
    def check(cls, settings: Any) -> None:
        """Raise ConfigError when the rule cannot run under these settings (Krum's n > 2f + 2)."""

    @classmethod
    def from_settings(cls, settings: Any) -> Self:
        """The rule built from settings that `check` has passed."""
        return cls()

    def client_settings(self) -> dict[str, Any]:
        """What each training task must add to the client's training (its "train" settings)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-friendly state saved in checkpoints (counters; tensors go in `tensor_state`)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from `state_dict()` output of the same rule. Raises ValueError if malformed."""

    def tensor_state(self) -> dict[str, np.ndarray]:
        """Server-side tensors (momentum, moments, a buffer) to save beside the model's.

        Float32, named "<slot>/<model tensor>" (e.g. "m/hidden1/kernel"); {} before
        the first step. The arrays are never changed in place afterwards (a step
        makes new ones), so a view taken under the state's lock can be written
        after the lock is released.
        """
        return {}

    def load_tensor_state(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Resume from `tensor_state()` output; call after `load_state_dict`, also with {}."""
        if tensors:
            raise ValueError(f"{self.name} keeps no tensors, got {', '.join(sorted(tensors))}")


class AsyncRule(Strategy):
    """A rule that takes each update as it arrives."""

    mode = "async"
    # Whether `accept` uses the snapshot the update was trained from (`base`).
    wants_base: ClassVar[bool] = False

    def accept(
        self, update: Update, current: Global, base: Global | None = None
    ) -> dict[str, np.ndarray] | None:
        """The next global weights, or None while the rule holds the update.

        `base`: the global model of `update.base_version`, when the aggregator
        still has it; rules with `wants_base` fall back to `current` without it.
        """
        raise NotImplementedError

    def flush(self, current: Global) -> dict[str, np.ndarray] | None:
        """Weights from updates still held when training ends; None when none are held."""
        return None

    @property
    def pending(self) -> int:
        """Updates accepted and held, not yet in a version."""
        return 0


class RoundRule(Strategy):
    """A rule that makes one version from the updates of a round.

    `min_updates` is the fewest updates the rule can combine. `check` compares
    it with the fewest updates a round is published with (`round_quorum`:
    MIN_CLIENTS at ROUND_DEADLINE, else CLIENTS_PER_ROUND); `aggregate` refuses
    fewer all the same (no new version).
    """

    mode = "rounds"
    min_updates: int = 1

    def aggregate(self, current: Global, updates: Sequence[Update]) -> dict[str, np.ndarray]:
        """The next global weights from a round's updates. Raises Refused if too few."""
        if len(updates) < self.min_updates:
            raise Refused(
                "too_few_updates",
                f"{self.name} needs at least {self.min_updates} updates per round, "
                f"the round has {len(updates)}",
            )
        return self.combine(current, updates)

    def combine(self, current: Global, updates: Sequence[Update]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @staticmethod
    def require_round(settings: Any, need: int, key: str, why: str, fix: str | None) -> None:
        """Refuse settings under which a round closes with fewer than `need` updates.

        `why` states the rule's condition, e.g. "KRUM_F=3 needs at least 9 updates
        per round (n > 2f + 2)"; the message adds where the round size comes from,
        and `fix`, the other way out (e.g. "lower KRUM_F").
        """
        quorum = settings.round_quorum
        if quorum >= need:
            return
        if settings.round_deadline is not None and quorum < settings.per_round:
            raise_ = "raise MIN_CLIENTS"
            if settings.min_clients:
                source = f"rounds close at MIN_CLIENTS={quorum} updates"
            else:
                source = "rounds close at ROUND_DEADLINE with 1 update (MIN_CLIENTS=0)"
        elif settings.clients_per_round:
            source, raise_ = f"CLIENTS_PER_ROUND is {quorum}", "raise it"
        else:
            source, raise_ = f"CLIENTS_PER_ROUND=0 samples {quorum} clients", "raise it"
        ways = f"{raise_} or {fix}" if fix else raise_
        raise ConfigError(key, str(value(settings, key)), f"{why}; {source}: {ways}")


def pack(slots: Mapping[str, Tensors]) -> dict[str, np.ndarray]:
    """Slot tensors as one flat dict: {"m": {"hidden1/kernel": x}} -> {"m/hidden1/kernel": x}."""
    return {f"{slot}/{name}": t for slot, tensors in slots.items() for name, t in tensors.items()}


def unpack(tensors: Mapping[str, np.ndarray], slots: Sequence[str]) -> dict[str, dict]:
    """The inverse of `pack` for exactly `slots`, each over the same names and shapes.

    Raises ValueError naming the first tensor that does not fit. {} gives {}.
    """
    if not tensors:
        return {}
    out: dict[str, dict[str, np.ndarray]] = {slot: {} for slot in slots}
    for key, tensor in tensors.items():
        slot, _, name = key.partition("/")
        if slot not in out or not name:
            raise ValueError(f"unexpected state tensor {key!r}; slots: {', '.join(slots)}")
        tensor = np.asarray(tensor)
        if tensor.dtype != np.float32 or not np.isfinite(tensor).all():
            raise ValueError(f"state tensor {key!r} must be finite float32")
        out[slot][name] = tensor
    first = out[slots[0]]
    for slot in slots:
        shapes = {n: t.shape for n, t in out[slot].items()}
        if shapes != {n: t.shape for n, t in first.items()}:
            raise ValueError(f"state slots {slots[0]!r} and {slot!r} differ in names or shapes")
    return out


def check_like(state: Tensors, model: Tensors, what: str) -> None:
    """Refuse server state whose names or shapes are not the model's (ValueError)."""
    for name, tensor in model.items():
        if name not in state or state[name].shape != tensor.shape:
            raise ValueError(f"{what} does not fit the model at tensor {name}")
    if len(state) != len(model):
        raise ValueError(f"{what} has tensors the model lacks")
