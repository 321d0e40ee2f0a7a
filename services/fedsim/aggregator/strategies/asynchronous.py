"""Asynchronous rules: each update is taken as it arrives, without rounds.

- `async-weighted`: the original running sample-weighted mean.
- `fedasync`: Xie, Koyejo, Gupta 2019, staleness-weighted mixing.
- `fedbuff`: Nguyen et al. 2022, buffered deltas applied every K updates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Self

import numpy as np

from fedsim.aggregator.strategies.aggregate import (
    fedasync_mix,
    fedbuff_weight,
    polynomial_staleness,
    weighted_merge,
)
from fedsim.aggregator.strategies.base import (
    AsyncRule,
    Global,
    Update,
    check_like,
    pack,
    unpack,
    value,
)
from fedsim.rules import (
    FEDASYNC_ALPHA,
    FEDASYNC_STALENESS,
    FEDBUFF_K,
    SERVER_LEARNING_RATE,
)
from fedsim.settings import ConfigError


class AsyncWeighted(AsyncRule):
    """The original rule: every update moves the global model by its share of the samples.

    w <- (a * w + b * w_k) / (a + b), a <- a + b, where a is the samples aggregated
    so far and b the update's samples. The base version is recorded, never refused.
    """

    name = "async-weighted"

    def accept(
        self, update: Update, current: Global, base: Global | None = None
    ) -> dict[str, np.ndarray]:
        return weighted_merge(
            current.tensors, update.tensors, a=current.samples, b=update.num_samples
        )


class FedAsync(AsyncRule):
    """FedAsync (Xie, Koyejo, Gupta 2019, arXiv:1903.03934, Algorithm 1, polynomial s).

    An update trained from version tau and arriving at version t is mixed in at
    once: alpha_t = alpha * (t - tau + 1) ** -a, x_t = (1 - alpha_t) x_{t-1} +
    alpha_t x_new. Every update makes a new version and none is refused; a = 0
    gives the constant rate alpha, alpha = 1 with a fresh update takes it whole.
    Stateless beyond the version, which the global model carries. Only the
    server's rule: clients train as usual, without the paper's proximal term rho.
    """

    name = "fedasync"

    def __init__(self, *, alpha: float, a: float) -> None:
        if not 0 < alpha <= 1 or a < 0:
            raise ValueError(f"bad fedasync settings: {alpha=}, {a=}")
        self.alpha, self.a = alpha, a

    @classmethod
    def from_settings(cls, settings: Any) -> Self:
        return cls(
            alpha=value(settings, FEDASYNC_ALPHA.key), a=value(settings, FEDASYNC_STALENESS.key)
        )

    def accept(
        self, update: Update, current: Global, base: Global | None = None
    ) -> dict[str, np.ndarray]:
        # t: the current version; tau: the version the client trained from.
        alpha_t = self.alpha * polynomial_staleness(current.version, update.base_version, a=self.a)
        return fedasync_mix(current.tensors, update.tensors, alpha_t=alpha_t)


def updates_in_run(settings: Any) -> int:
    """Training updates an asynchronous run makes: every slice of every range under
    PARTITION=slices, else ROUNDS x CLIENTS_PER_ROUND (see tasks.py)."""
    if settings.partition == "slices":
        return sum(hi - lo + 1 for lo, hi in settings.client_slices)
    return settings.rounds * settings.per_round


class FedBuff(AsyncRule):
    """FedBuff (Nguyen et al., AISTATS 2022, arXiv:2106.06639, Algorithm 1).

    Each update's delta is taken against the model its client trained from:
    Delta_k = w_k - w_{tau_k}. The server adds it to a buffer weighted by its
    staleness, B <- B + s(t - tau_k) * Delta_k with s(tau) = 1 / sqrt(1 + tau),
    and after K updates steps: w <- w + eta * B / K, B <- 0. Sample counts do
    not enter (the paper averages clients equally).

    The aggregator passes the base model (`base`) while it still keeps that
    version; without it the delta is taken against the current model,
    w_k - w_t, which also undoes what the versions since tau_k added: exact for
    fresh updates, an approximation for stale ones. While buffering, `accept`
    returns None (the update counts, no new version); the buffer is tensor state,
    saved with checkpoints. Updates still buffered when training ends are applied
    by `flush` as a smaller step, w + eta * B / c for the c held, so no trained
    update is lost.
    """

    name = "fedbuff"
    wants_base = True
    default_eta: ClassVar[float] = 1.0

    def __init__(self, *, k: int, eta: float) -> None:
        if k < 1 or not eta > 0:
            raise ValueError(f"bad fedbuff settings: {k=}, {eta=}")
        self.k, self.eta = k, eta
        self._buffer: dict[str, np.ndarray] = {}  # float32, the sum of weighted deltas
        self._count = 0

    @classmethod
    def check(cls, settings: Any) -> None:
        k = value(settings, FEDBUFF_K.key)
        total = updates_in_run(settings)
        if k > total:
            if settings.partition == "slices":
                where, fix = "the slices in CLIENT_SLICES", "lower FEDBUFF_K"
            else:
                where, fix = "ROUNDS x CLIENTS_PER_ROUND", "lower FEDBUFF_K or raise ROUNDS"
            raise ConfigError(
                FEDBUFF_K.key,
                str(k),
                f"the run makes only {total} updates ({where}), fewer than one buffer: {fix}",
            )

    @classmethod
    def from_settings(cls, settings: Any) -> Self:
        return cls(
            k=value(settings, FEDBUFF_K.key),
            eta=value(settings, SERVER_LEARNING_RATE.key) or cls.default_eta,
        )

    @property
    def pending(self) -> int:
        return self._count

    def accept(
        self, update: Update, current: Global, base: Global | None = None
    ) -> dict[str, np.ndarray] | None:
        start = base if base is not None and base.version == update.base_version else current
        weight = fedbuff_weight(current.version - update.base_version)
        if self._buffer:
            check_like(self._buffer, current.tensors, "the fedbuff buffer")
        for name, w_t in start.tensors.items():
            delta = np.asarray(update.tensors[name], np.float64) - w_t
            acc = self._buffer.get(name)
            total = weight * delta if acc is None else acc + weight * delta
            self._buffer[name] = total.astype(np.float32)
        self._count += 1
        if self._count < self.k:
            return None
        return self._step(current, self._count)  # K, or more if K was lowered on a restart

    def flush(self, current: Global) -> dict[str, np.ndarray] | None:
        return self._step(current, self._count) if self._count else None

    def _step(self, current: Global, divisor: int) -> dict[str, np.ndarray]:
        out = {
            name: (w + self.eta * self._buffer[name].astype(np.float64) / divisor).astype(
                np.float32
            )
            for name, w in current.tensors.items()
        }
        self._buffer, self._count = {}, 0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"buffered": self._count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        count = state.get("buffered", 0)
        if type(count) is not int or count < 0:
            raise ValueError(f"fedbuff state 'buffered' must be an integer >= 0, got {count!r}")
        self._count = count

    def tensor_state(self) -> dict[str, np.ndarray]:
        return pack({"buffer": self._buffer}) if self._count else {}

    def load_tensor_state(self, tensors: Mapping[str, np.ndarray]) -> None:
        slots = unpack(tensors, ("buffer",))
        if bool(slots) != bool(self._count):
            raise ValueError(
                f"fedbuff state holds {self._count} buffered updates but "
                f"{'a' if slots else 'no'} buffer"
            )
        self._buffer = {n: t.copy() for n, t in slots.get("buffer", {}).items()}
