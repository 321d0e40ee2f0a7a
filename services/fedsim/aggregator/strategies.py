"""Aggregation strategies: how accepted client updates become the next global model.

- `async-weighted`: the original running sample-weighted mean, one new version
  per update.
- `fedavg`: Federated Averaging, McMahan, Moore, Ramage, Hampson, Agüera y Arcas,
  "Communication-Efficient Learning of Deep Networks from Decentralized Data",
  AISTATS 2017, arXiv:1602.05629. Synchronous rounds; the new global model is
  the mean of the round's client models weighted by their sample counts n_k.
- `fedasync`: FedAsync, Xie, Koyejo, Gupta, "Asynchronous Federated Optimization",
  arXiv:1903.03934. Each update is mixed in at once with a rate that shrinks
  with its staleness: alpha_t = alpha * s(t - tau), x_t = (1 - alpha_t) x_{t-1}
  + alpha_t x_new, with the polynomial s(t - tau) = (t - tau + 1) ** -a.

An asynchronous rule sees the current global model and one update and returns
the next global weights; a round rule sees the round's updates at once. Neither
touches HTTP, checkpoints, validation or the choice of clients (tasks.py), so a
new rule is one more class here. The math
lives in small pure numpy functions, tested on hand-worked arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    from fedsim.config import Settings

Tensors = Mapping[str, np.ndarray]


# --- math ---------------------------------------------------------------------------


def weighted_merge(
    global_w: Tensors, client_w: Tensors, *, a: int, b: int
) -> dict[str, np.ndarray]:
    """The running weighted mean: w = (a * w_global + b * w_client) / (a + b).

    Computed as w_global + b / (a + b) * (w_client - w_global): the same value,
    without a * w_global growing with the sample count.
    """
    if a < 0 or b <= 0:
        raise ValueError(f"need a >= 0 and b > 0, got a={a}, b={b}")
    step = b / (a + b)
    return {
        name: (g + np.float32(step) * (client_w[name] - g)).astype(np.float32, copy=False)
        for name, g in global_w.items()
    }


def weighted_mean(models: Sequence[Tensors], counts: Sequence[int]) -> dict[str, np.ndarray]:
    """FedAvg's aggregate: w = sum_k (n_k / n) * w_k, with n = sum_k n_k.

    Accumulated in float64 so the order of the clients does not change the result.
    """
    if not models:
        raise ValueError("no models to average")
    if any(n_k <= 0 for n_k in counts):
        raise ValueError(f"sample counts must be positive, got {list(counts)}")
    n = sum(counts)
    out: dict[str, np.ndarray] = {}
    for name in models[0]:
        acc = np.zeros(models[0][name].shape, dtype=np.float64)
        for w_k, n_k in zip(models, counts, strict=True):
            acc += (n_k / n) * w_k[name]
        out[name] = acc.astype(np.float32)
    return out


def polynomial_staleness(t: int, tau: int, *, a: float) -> float:
    """FedAsync's polynomial staleness function s(t - tau) = (t - tau + 1) ** -a.

    1 for a fresh update (tau = t) or a = 0, smaller the older the base version.
    A base ahead of t (a client that saw versions a resumed aggregator lost)
    counts as fresh.
    """
    if a < 0:
        raise ValueError(f"need a >= 0, got a={a}")
    return float((max(t - tau, 0) + 1) ** -a)


def fedasync_mix(global_w: Tensors, client_w: Tensors, *, alpha_t: float) -> dict[str, np.ndarray]:
    """FedAsync's update x_t = (1 - alpha_t) * x_{t-1} + alpha_t * x_new.

    Computed as x_{t-1} + alpha_t * (x_new - x_{t-1}), like `weighted_merge`.
    """
    if not 0 < alpha_t <= 1:
        raise ValueError(f"need 0 < alpha_t <= 1, got alpha_t={alpha_t}")
    return {
        name: (x + np.float32(alpha_t) * (client_w[name] - x)).astype(np.float32, copy=False)
        for name, x in global_w.items()
    }


# --- the interface --------------------------------------------------------------------


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
    """The global model as a strategy sees it."""

    tensors: Tensors
    version: int
    samples: int  # samples aggregated into `tensors` so far


class Strategy:
    """Turns accepted updates into new global weights.

    `mode` says how the aggregator runs it, and what it advertises to workers:
    "async" rules take one update at a time (`accept`); "rounds" rules take the
    updates of a round at once (`aggregate`), the round itself (sampling, quorum,
    timeout) being the task queue's (tasks.py).
    """

    name: ClassVar[str]
    mode: ClassVar[str]

    def state_dict(self) -> dict[str, Any]:
        """JSON-friendly state saved in checkpoints (e.g. a server optimizer's moments)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from `state_dict()` output of the same strategy."""


class AsyncRule(Strategy):
    """A rule that makes a new version from each update as it arrives."""

    mode = "async"

    def accept(self, update: Update, current: Global) -> dict[str, np.ndarray]:
        raise NotImplementedError


class RoundRule(Strategy):
    """A rule that makes a new version from the updates of a round."""

    mode = "rounds"

    def aggregate(self, current: Global, updates: Sequence[Update]) -> dict[str, np.ndarray]:
        raise NotImplementedError


class AsyncWeighted(AsyncRule):
    """The original rule: every update moves the global model by its share of the samples.

    w <- (a * w + b * w_k) / (a + b), a <- a + b, where a is the samples aggregated
    so far and b the update's samples. The base version is recorded, never refused.
    """

    name = "async-weighted"

    def accept(self, update: Update, current: Global) -> dict[str, np.ndarray]:
        return weighted_merge(
            current.tensors, update.tensors, a=current.samples, b=update.num_samples
        )


class FedAvg(RoundRule):
    """Federated Averaging (McMahan et al. 2017, arXiv:1602.05629, Algorithm 1).

    Each round t, C sampled clients train from w_t; the new model is the mean of
    their models weighted by their sample counts: w_{t+1} = sum_k (n_k / n) w_k,
    n = sum_k n_k.
    """

    name = "fedavg"

    def aggregate(self, current: Global, updates: Sequence[Update]) -> dict[str, np.ndarray]:
        return weighted_mean([u.tensors for u in updates], [u.num_samples for u in updates])


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

    def accept(self, update: Update, current: Global) -> dict[str, np.ndarray]:
        # t: the current version; tau: the version the client trained from.
        alpha_t = self.alpha * polynomial_staleness(current.version, update.base_version, a=self.a)
        return fedasync_mix(current.tensors, update.tensors, alpha_t=alpha_t)


def build(settings: Settings) -> Strategy:
    """The strategy named by `AGGREGATION`."""
    if settings.aggregation == AsyncWeighted.name:
        return AsyncWeighted()
    if settings.aggregation == FedAvg.name:
        return FedAvg()
    if settings.aggregation == FedAsync.name:
        return FedAsync(alpha=settings.fedasync_alpha, a=settings.fedasync_staleness)
    raise ValueError(f"unknown strategy {settings.aggregation!r}")
