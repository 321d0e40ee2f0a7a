"""The privacy accountant: epsilon at DP_DELTA after r rounds, and the rounds DP_EPSILON_BUDGET allows.

Google's dp-accounting (RDP) does the arithmetic; this module says what was done:

- DP=central: each round samples m = CLIENTS_PER_ROUND of K logical clients
  uniformly without replacement (tasks/ids.py: `sample`) and releases the mean of
  their clipped deltas plus N(0, (z S / m)^2). That is one
  `SampledWithoutReplacementDpEvent(K, m, GaussianDpEvent(z / 2))` per round,
  composed over the rounds. dp-accounting models sampling without replacement
  under replace-one adjacency (K public, one client's data swapped for anyone's),
  under which the sum of m clipped deltas moves by up to 2S: the noise's std zS
  on the sum is z / 2 times that sensitivity, hence z / 2.
- DP=local: each update a client sends is its own Gaussian mechanism (std zS,
  sensitivity 2S: z / 2), with no amplification (the aggregator sees who sent
  what). A client's epsilon composes over the rounds it took part in; reported is
  the largest over the clients, counted from the seeded sampling.
- DP_NOISE=0: no bound, epsilon is infinite (shown as "ε = ∞", null in JSON).

The accountant's state is the number of rounds closed, which the task queue
saves in every checkpoint (`rounds_done`), and the DP settings they were made
with, which the dp stage saves beside it: a run resumes only with the same
settings (`resume_problem`), and epsilon is recomputed from the rounds, so a run
killed and resumed reports the same epsilon as an unbroken one. A round whose
aggregate is refused counts: its noised mean was computed, and the refusal,
which is public, is a function of it. Epsilon does not depend on the data, so
the budget is a number of rounds known at start: the largest r with
epsilon(r) <= DP_EPSILON_BUDGET.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from typing import Any

from fedsim.aggregator.tasks import ids
from fedsim.config import Settings
from fedsim.pipeline.dp import params_of
from fedsim.settings import ConfigError

log = logging.getLogger("fedsim.aggregator")

__all__ = [
    "Privacy",
    "central_epsilon",
    "local_epsilon",
    "resume_problem",
    "rounds_allowed",
    "shown",
]


def central_epsilon(clients: int, per_round: int, noise: float, rounds: int, delta: float) -> float:
    """Epsilon at `delta` after `rounds` rounds of DP=central; inf when noise is 0.

    RDP composes by adding: r rounds have r times one round's RDP at each order, which
    is what the accountant's `compose` adds up too. One round's RDP takes dp-accounting
    about 0.2 s to compute (and again on every compose), so it is computed once per
    (K, m, z) and scaled; the conversion to epsilon is the library's `compute_epsilon`.
    """
    if rounds == 0:
        return 0.0
    if noise == 0:
        return math.inf
    from dp_accounting.rdp import rdp_privacy_accountant

    orders, one = _round_rdp(clients, per_round, noise)
    return float(rdp_privacy_accountant.compute_epsilon(orders, rounds * one, delta)[0])


@functools.lru_cache(maxsize=64)
def _round_rdp(clients: int, per_round: int, noise: float) -> tuple[Any, Any]:
    """(orders, one round's RDP at each): one SampledWithoutReplacementDpEvent."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(
        dp_accounting.SampledWithoutReplacementDpEvent(
            clients, per_round, dp_accounting.GaussianDpEvent(noise / 2)
        )
    )
    # The accountant keeps its orders and RDP in these (dp-accounting 0.6.0, pinned);
    # test_dp_accounting checks the result against composing round by round.
    return accountant._orders.copy(), accountant._rdp.copy()


def local_epsilon(noise: float, participations: int, delta: float) -> float:
    """Epsilon at `delta` of a client that sent `participations` locally noised updates."""
    if participations == 0:
        return 0.0
    if noise == 0:
        return math.inf
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.GaussianDpEvent(noise / 2), participations)
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=4096)
def _epsilon(
    mode: str, clients: int, per_round: int, noise: float, delta: float, seed: int, rounds: int
) -> float:
    if mode == "central":
        return central_epsilon(clients, per_round, noise, rounds, delta)
    return local_epsilon(noise, most_participations(seed, per_round, clients, rounds), delta)


def most_participations(seed: int, per_round: int, clients: int, rounds: int) -> int:
    """The most rounds any one client was sampled in, among the first `rounds`."""
    seen: Counter[int] = Counter()
    for r in range(1, rounds + 1):
        seen.update(ids.sample(seed, r, per_round, clients))
    return max(seen.values(), default=0)


class Privacy:
    """Epsilon of one run's settings after r rounds, the budget's last round, the status block."""

    def __init__(self, settings: Settings) -> None:
        self.mode = settings.dp
        self.clients, self.per_round = settings.logical_clients, settings.per_round
        self.noise, self.clip, self.delta = settings.dp_noise, settings.dp_clip, settings.delta
        self.quantile = settings.dp_clip_quantile  # adaptive clipping's target; 0: fixed norm
        self.budget = settings.dp_epsilon_budget or None
        self.seed, self.rounds = settings.seed, settings.rounds
        self.allowed = self._rounds_allowed()  # the last round the budget allows
        # One round's epsilon now loads the accountant: a broken install of dp-accounting
        # stops the start with its error instead of failing /v1/status later.
        self.epsilon(1)
        if self.allowed == 0:
            raise ConfigError(
                "DP_EPSILON_BUDGET",
                f"{self.budget:g}",
                f"below the epsilon of one round ({self.epsilon(1):.3f} at delta "
                f"{self.delta:.3g}): raise it, raise DP_NOISE, or sample fewer clients per round",
            )

    @classmethod
    def of(cls, settings: Settings) -> Privacy | None:
        """The run's accountant, or None when DP is off."""
        return None if settings.dp == "off" else cls(settings)

    def epsilon(self, rounds: int) -> float:
        """Epsilon at DP_DELTA once `rounds` rounds have closed."""
        return _epsilon(
            self.mode, self.clients, self.per_round, self.noise, self.delta, self.seed, rounds
        )

    def _rounds_allowed(self) -> int:
        """ROUNDS, or fewer: the largest r <= ROUNDS with epsilon(r) <= DP_EPSILON_BUDGET."""
        if self.budget is None or self.epsilon(self.rounds) <= self.budget:
            return self.rounds
        lo, hi = 0, self.rounds  # epsilon(lo) <= budget < epsilon(hi); epsilon grows with r
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.epsilon(mid) <= self.budget else (lo, mid)
        return lo

    def stop_reason(self) -> str | None:
        """One line on why the run stops before ROUNDS, or None when the budget allows them all."""
        if self.allowed >= self.rounds:
            return None
        nxt = self.epsilon(self.allowed + 1)
        return (
            f"DP_EPSILON_BUDGET={self.budget:g}: round {self.allowed + 1} would take epsilon to "
            f"{nxt:.3f} at delta {self.delta:.3g}; the run stops after round {self.allowed} "
            f"of ROUNDS={self.rounds}"
        )

    def status(self, rounds_done: int) -> dict[str, Any]:
        """The `privacy` block of /v1/status: epsilon so far (None: infinite) and the settings."""
        eps = self.epsilon(rounds_done)
        return {
            "mode": self.mode,
            "epsilon": shown(eps),
            "delta": self.delta,
            "clip": self.clip,
            "noise_multiplier": self.noise,
            "rounds_composed": rounds_done,
            "budget": self.budget,
            "rounds_allowed": self.allowed,
            "stop_reason": self.stop_reason(),
            "adjacency": "replace one client",
        }


def shown(epsilon: float) -> float | None:
    """Epsilon as JSON carries it: rounded, None when infinite (JSON has no infinity)."""
    return None if math.isinf(epsilon) else round(epsilon, 6)


def rounds_allowed(settings: Settings) -> int:
    """The rounds the run may do: ROUNDS, or fewer under DP_EPSILON_BUDGET. Raises ConfigError."""
    account = Privacy.of(settings)
    return settings.rounds if account is None else account.allowed


# The settings each saved DP parameter comes from, for the refusal's message.
_KEYS = {
    "mode": "DP",
    "clients": "NUM_CLIENTS (logical clients)",
    "per_round": "CLIENTS_PER_ROUND",
    "noise": "DP_NOISE",
    "delta": "DP_DELTA",
    "clip_at": "DP_CLIP_AT",
    "quantile": "DP_CLIP_QUANTILE",
}


def resume_problem(settings: Settings, saved: Any, rounds: int) -> str | None:
    """Why a checkpoint with `rounds` rounds closed, whose dp stage saved `saved` (None: no
    DP state), cannot resume under `settings`' DP, in one line; None when it can.

    Epsilon composes the rounds done with those to come under the settings of now, so
    they must be the ones the rounds were made with; and the rounds released must fit in
    what ROUNDS and DP_EPSILON_BUDGET allow (the queue would otherwise forget the extra).
    """
    if rounds <= 0:
        return None
    before = saved.get("params") if isinstance(saved, dict) else None
    if settings.dp == "off":
        if before is None:
            return None
        return (
            f"its {rounds} rounds were made under DP={before.get('mode')}: resuming with "
            "DP=off would publish rounds without noise and stop accounting for epsilon"
        )
    if before is None:
        return (
            f"its {rounds} rounds have no record of being made under DP (DP=off, or a "
            f"checkpoint older than that record): DP={settings.dp} cannot account for them"
        )
    now = params_of(settings)
    diffs = [
        f"{_KEYS.get(k, k)} was {before.get(k)!r}, now {now.get(k)!r}"
        for k in sorted(set(now) | set(before))
        if before.get(k) != now.get(k)
    ]
    if diffs:
        return (
            f"its {rounds} rounds were made with other DP settings ({'; '.join(diffs)}): "
            "epsilon cannot compose them with rounds under these"
        )
    allowed = rounds_allowed(settings)
    if rounds > allowed:
        account = Privacy(settings)
        why = (
            f"DP_EPSILON_BUDGET={account.budget:g} allows {allowed}"
            if allowed < settings.rounds
            else f"ROUNDS={settings.rounds}"
        )
        return (
            f"its {rounds} rounds released already took epsilon to "
            f"{text(account.epsilon(rounds))} at delta {account.delta:.3g}, more rounds than "
            f"{why}"
        )
    return None


def status_of(core: Any) -> dict[str, Any] | None:
    """/v1/status's `privacy` block; None when DP is off. Caller holds the state's lock."""
    account: Privacy | None = core.privacy
    if account is None:
        return None
    block = account.status(rounds_done(core))
    adaptive = core.stages.state_dict().get("dp", {})  # adaptive clipping's current norm
    block["clip"] = adaptive.get("clip_norm", account.clip)
    block["adaptive_clipping"] = bool(account.quantile)
    return block


def rounds_done(core: Any) -> int:
    """Rounds closed so far: the accountant's state, saved with every checkpoint by the queue."""
    return int(getattr(core.queue, "rounds_done", 0))


def announce(core: Any) -> None:
    """At start: the DP settings, epsilon so far, and where the budget stops the run (log)."""
    account: Privacy | None = core.privacy
    if account is None:
        return
    done = rounds_done(core)
    log.info(
        "differential privacy: DP=%s, DP_CLIP=%g, DP_NOISE=%g, %d of %d clients per round; "
        "epsilon %s at delta %.3g after %d rounds",
        account.mode,
        account.clip,
        account.noise,
        account.per_round,
        account.clients,
        text(account.epsilon(done)),
        account.delta,
        done,
    )
    if account.noise == 0:
        log.warning("DP_NOISE=0: clipping without noise, epsilon is infinite")
    reason = account.stop_reason()
    if reason:
        log.info("%s", reason)


def after_round(core: Any, number: int) -> None:
    """A round closed: epsilon in /metrics, and the budget's stop said once, when it comes."""
    account: Privacy | None = core.privacy
    if account is None:
        return
    eps = account.epsilon(rounds_done(core))
    core.metrics.dp_epsilon(eps)
    if number == account.allowed and account.allowed < account.rounds:
        reason = account.stop_reason()
        log.info("round %d: epsilon %s; stopping: %s", number, text(eps), reason)
        core.events.add("finished", f"privacy budget: {reason}")


def text(epsilon: float) -> str:
    """Epsilon for people: '∞' when there is no bound."""
    return "∞" if math.isinf(epsilon) else f"{epsilon:.3f}"
