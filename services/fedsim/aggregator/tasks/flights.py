"""Asynchronous rules under CLOCK=virtual: C simulated clients in flight, a discrete-event plan.

The run is simulated, not raced: C = CLIENTS_PER_ROUND clients are in flight at
once on the simulated clock (tasks/clock.py). Update n (1 .. ROUNDS x C, task
`u<n>.c<client>`) starts at simulated time s_n on the global version v_n current
then, by a client drawn with a generator seeded by (SEED, n) among those online
at s_n and not in flight; it finishes at f_n = s_n + d_n, its duration from the
population (speed, bandwidth, the task's size, its dropped attempts). Finishes
are applied in (f_n, task id) order; each one frees a slot, and the next update
starts at that finish on the version just made (or, when no free client is
online then, at the first moment one is). Its staleness is

    staleness_n = V(f_n) - v_n,

the versions made between its start and its finish (V(t): the version at t), so
slow clients (a larger d_n) come back staler, whatever real order the workers
push in. This is how FedBuff's experiments simulate asynchrony (Nguyen et al., AISTATS
2022, arXiv:2106.06639: a fixed concurrency of clients training at once, a new
one drawn uniformly as one finishes, each with its own duration),
applied in the conservative order of Chandy and Misra 1979 (tasks/clock.py). A task is handed out only once it has started in simulated time, that
is once the version it starts from exists; a worker trains it on that version
(`?version=` of /v1/model), even when newer ones were made since. Every start,
draw and finish hangs on the seed and the population only, so the same seed
gives the same versions with 1 or 10 workers, on a loaded machine or not.

The queue holds the plan (who flies, from which version, since when); the state
applies updates when the clock releases them (aggregator/virtual_async.py).
Its progress is saved in checkpoints; updates that had arrived but were still
waiting for their turn are not, and are handed out again after a restart.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsim.aggregator.strategies import Refused
from fedsim.aggregator.tasks import ids
from fedsim.aggregator.tasks.clock import Duration, VirtualClock
from fedsim.aggregator.tasks.ids import Client
from fedsim.aggregator.tasks.leases import Worker
from fedsim.aggregator.tasks.queues import Queue
from fedsim.protocol import Offer

# A checkpoint holds the versions flights start from beside the rule's tensors, as
# "<BASE_TENSORS><version>/<model tensor>" (aggregator/virtual_async.py).
BASE_TENSORS = "flight-base.v"
DRAW = 0xA5C  # tags the generator of an update's client, apart from the rounds' samples
NextOnline = Callable[[int, float], float | None]  # (client number, t) -> first t' >= t online


@dataclass(frozen=True)
class Flight:
    """Update n in flight: its client, the version it starts from, when it starts."""

    n: int
    client: int
    base: int
    start: float

    @property
    def task(self) -> str:
        return ids.update_task(self.n, self.client)


class FlightQueue(Queue):
    """Asynchronous rules under CLOCK=virtual (not PARTITION=slices); see the module docstring.

    `duration` (set before the first `start`): a task's simulated seconds. `next_online`:
    when a client is next online (None: always)."""

    kind = "flights"

    def __init__(
        self, clients: Sequence[Client], next_online: NextOnline | None = None, **kw: Any
    ) -> None:
        super().__init__(clients, **kw)
        assert isinstance(self.run_clock, VirtualClock)
        self.clock: VirtualClock = self.run_clock
        self.total = self.rounds * self.per_round
        self.next_online = next_online
        self.duration: Duration | None = None
        self.flying: dict[int, Flight] = {}  # started, not applied yet
        self.landed: set[int] = set()  # applied (or refused by the rule: spent)
        self.waiting: set[int] = set()  # arrived, waiting for their simulated turn
        self.clients_of: dict[int, int] = {}  # every update started so far -> its client
        self.started = 0  # updates 1 .. started have started
        self.resumed = False  # flights came from a checkpoint: the clock awaits them anew

    # --- the plan --------------------------------------------------------------------------

    def start(self, version: int) -> list[Flight]:
        """Start what may start at the clock's now: one update per free slot, on `version`,
        each by a client online now and not in flight. The flights started."""
        assert self.duration is not None, "the driver sets the duration first"
        if self.resumed:  # after a restart the clock awaits the saved flights again
            self.resumed = False
            for f in sorted(self.flying.values(), key=lambda f: f.n):
                self.clock.schedule(f.task, f.start, self.duration(f.client, f.task))
        new: list[Flight] = []
        now = self.clock.now
        while len(self.flying) < self.per_round and self.started < self.total:
            free = self._free_online(now)
            if not free:
                break  # the next start waits for a client to come online (`start_at`)
            n = self.started + 1
            rng = np.random.default_rng([self.seed, DRAW, n])
            number = free[int(rng.integers(len(free)))]
            flight = Flight(n, number, version, now)
            self.started, self.clients_of[n], self.flying[n] = n, number, flight
            self.clock.schedule(flight.task, now, self.duration(number, flight.task))
            new.append(flight)
        return new

    def _idle(self) -> list[int]:
        busy = {f.client for f in self.flying.values()}
        return [n for n in sorted(self.clients) if n not in busy]

    def _free_online(self, t: float) -> list[int]:
        idle = self._idle()
        if self.next_online is None:
            return idle
        return [n for n in idle if self.next_online(n, t) == t]

    def start_at(self) -> float | None:
        """When the next start may happen, if a slot is free but no free client is online
        now: the first moment one comes online (a timer for the clock); else None."""
        if len(self.flying) >= self.per_round or self.started >= self.total:
            return None
        if self.next_online is None:
            return None
        now = self.clock.now
        times = [self.next_online(n, now) for n in self._idle()]
        upcoming = [t for t in times if t is not None and t > now]
        return min(upcoming, default=None) if not any(t == now for t in times) else None

    def land(self, task_id: str) -> Flight:
        """The update of `task_id` is taken at its simulated finish: its slot is free."""
        n = ids.parse_update(task_id)[0]  # type: ignore[index]
        flight = self.flying.pop(n)
        self.landed.add(n)
        self.waiting.discard(n)
        return flight

    def bases(self) -> set[int]:
        """The versions the flights start from (served to the workers that train them)."""
        return {f.base for f in self.flying.values()}

    def stalled(self) -> bool:
        """Slots free, updates left, and no client will ever come online again."""
        return (
            not self.flying
            and self.started < self.total
            and self.start_at() is None
            and not self._free_online(self.clock.now)
        )

    # --- handing out, results ----------------------------------------------------------

    def _training(self, worker: Worker, version: int, now: float, uid: str) -> Offer:
        for n in sorted(self.flying):
            f = self.flying[n]
            if n in self.waiting or f.task in self.leases:
                continue
            client = self.clients[f.client]
            return Offer(self._train_task(f.task, client, worker, now, f.base))
        if self.training_done:
            return self._finished_offer()
        if self.stalled():
            return Offer(None, reason="no client is online again before the run ends")
        return Offer(None, reason="waiting for updates due earlier in simulated time")

    def _client_of(self, task_id: str) -> Client | None:
        parsed = ids.parse_update(task_id)
        if parsed is None or self.clients_of.get(parsed[0]) != parsed[1]:
            return None
        return self.clients[parsed[1]]

    def _is_done(self, task_id: str) -> bool:
        n = ids.parse_update(task_id)[0]  # type: ignore[index]
        return n in self.landed or n in self.waiting

    def _mark_done(self, task_id: str) -> None:
        n = ids.parse_update(task_id)[0]  # type: ignore[index]
        if n in self.flying:
            self.waiting.add(n)

    def _check_open(self, task_id: str, base_version: int, version: int) -> None:
        n = ids.parse_update(task_id)[0]  # type: ignore[index]
        flight = self.flying.get(n)
        if flight is not None and base_version != flight.base:
            raise Refused(
                "stale",
                f"task {task_id} starts from version {flight.base} in simulated time; this "
                f"update was trained from version {base_version}",
            )

    @property
    def plan_done(self) -> bool:
        return len(self.landed) >= self.total or (self.stalled() and not self.waiting)

    # --- checkpoints -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        out = super().status()
        out["flights"] = {
            "in_flight": len(self.flying),
            "waiting": len(self.waiting),
            "applied": len(self.landed),
            "updates": self.total,
        }
        return out

    def state_dict(self) -> dict[str, Any]:
        # Arrived updates still waiting for their turn are not saved: after a restart their
        # tasks are in flight again and handed out anew (the same seed, the same update).
        return {
            "updates_done": ids.ranges(sorted(self.landed)),
            "clients_of": [self.clients_of[n] for n in range(1, self.started + 1)],
            "flying": [[f.n, f.base, f.start] for f in sorted(self.flying.values(), key=_n)],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("updates_done") and "clients_of" not in state:
            raise ValueError(
                "its updates were made under CLOCK=real, which draws clients otherwise: "
                "resume with CLOCK=real, or reset (docker compose down -v)"
            )
        started = state.get("clients_of", [])
        if not isinstance(started, list) or not all(
            isinstance(c, int) and c in self.clients for c in started
        ):
            raise ValueError("bad clients_of: client numbers of the run expected")
        self.started = min(len(started), self.total)
        self.clients_of = {n: started[n - 1] for n in range(1, self.started + 1)}
        self.landed = ids.unranges(str(state.get("updates_done", "")), self.started)
        flying = state.get("flying", [])
        if not isinstance(flying, list):
            raise ValueError(f"bad flights: {flying!r}")
        self.flying = {}
        for entry in flying:
            if not (
                isinstance(entry, list)
                and len(entry) == 3
                and all(isinstance(x, int) and not isinstance(x, bool) for x in entry[:2])
                and _seconds(entry[2])
                and 1 <= entry[0] <= self.started
                and entry[0] not in self.landed
                and entry[1] >= 0
            ):
                raise ValueError(f"bad flight: {entry!r}")
            n, base, start = entry
            self.flying[n] = Flight(n, self.clients_of[n], base, float(start))
        self.waiting = set()
        self.resumed = bool(self.flying)

    def rebase(self, n: int, version: int) -> Flight:
        """Start flight n from `version` instead (its own is lost after a restart)."""
        flight = self.flying[n]
        self.flying[n] = Flight(n, flight.client, version, flight.start)
        return self.flying[n]


def _n(f: Flight) -> int:
    return f.n


def _seconds(t: Any) -> bool:
    return isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t) and t >= 0
