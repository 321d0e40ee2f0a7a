"""CLOCK=virtual: updates taken in the order they would have arrived, a discrete-event order.

Each task gets a simulated duration from the population model and the task's size
when it is scheduled (never from the real time it took): it finishes at
T = start + duration on the simulated clock. Workers push in any real order; an
update whose simulated finish is T waits in memory until every outstanding task
that would finish before T has arrived, then is released at simulated time T
(the conservative rule of Chandy and Misra, "Distributed simulation: a case study
in design and verification of distributed programs", IEEE TSE 5(5), 1979). Ties
go by task id. A timer (a round's deadline) fires at its time once nothing still
outstanding or waiting finishes at or before it. So the sequence of released
events, and every version made from it, is the same whatever the real arrival
order, the number of workers or the machine's load.

`Rounds` (virtual_rounds.py) drives a RoundQueue with it: a round (or a retried attempt) opens at the
simulated time the previous one ended, its tasks start then, and arrivals and
deadlines reach the queue in simulated order. A task that a round no longer
wants (cancelled by over-selection, or of a failed attempt) stops being awaited.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedsim.aggregator.tasks.ids import task_seed
from fedsim.data.population import Population, drop_draw
from fedsim.models import parameter_count

if TYPE_CHECKING:
    from fedsim.aggregator.tasks.ids import Client

Duration = Callable[[int, str], float]  # (client number, task id) -> simulated seconds

# The nominal compute cost of one sample for one epoch on the reference worker, in
# simulated seconds (base_seconds_per_sample of the population's formula). Fixed, not
# measured per run: a measured cost would change with the machine's load, and with it
# the history. cnn: docs/benchmarks.md's W2 loop, 131.8 s for 10 x 5 x 600 sample-epochs;
# mlp: a twentieth of it (about its share of the cnn's multiply-adds, not measured).
SECONDS_PER_SAMPLE = {"cnn": 131.8 / 30_000, "mlp": 131.8 / 30_000 / 20}


def _load_now(state: Mapping[str, Any]) -> float:
    now = state.get("now", 0.0)
    if not isinstance(now, int | float) or isinstance(now, bool) or not now >= 0:
        raise ValueError(f"bad run time: {now!r}")
    if not math.isfinite(now):
        raise ValueError(f"bad run time: {now!r}")
    return float(now)


class RealClock:
    """CLOCK=real: the run's seconds go with the real ones, TIME_SCALE of them per real
    second, counted on from what the checkpoint saved (so availability goes on after a
    restart where it left off)."""

    kind = "real"

    def __init__(self, clock: Callable[[], float], scale: float = 1.0, now: float = 0.0) -> None:
        self._clock, self.scale = clock, scale
        self._t0, self._start = clock(), now

    def __call__(self) -> float:
        return self._start + (self._clock() - self._t0) * self.scale

    def state_dict(self) -> dict[str, Any]:
        return {"now": self()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._t0, self._start = self._clock(), _load_now(state)


@dataclass(frozen=True, order=True)
class Event:
    at: float  # simulated seconds
    task: str  # the task whose update arrives; "" for a timer
    item: Any = None  # the update, as the caller gave it

    @property
    def timer(self) -> bool:
        return self.task == ""


class VirtualClock:
    """Simulated time, the tasks still awaited and the updates waiting for their turn."""

    kind = "virtual"

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.outstanding: dict[str, float] = {}  # task -> simulated finish, not arrived yet
        self.pending: dict[str, tuple[float, Any]] = {}  # arrived, waiting: task -> (T, item)

    def schedule(self, task: str, start: float, duration: float) -> float:
        """Await `task`, which starts at `start` and takes `duration`; its finish."""
        if task not in self.outstanding and task not in self.pending:
            self.outstanding[task] = start + max(0.0, duration)
        return self.finish_of(task)  # type: ignore[return-value]

    def __call__(self) -> float:
        return self.now

    def finish_of(self, task: str) -> float | None:
        if task in self.outstanding:
            return self.outstanding[task]
        return self.pending[task][0] if task in self.pending else None

    def arrive(self, task: str, item: Any) -> bool:
        """`task`'s update arrived (real time): it waits for its turn. False when the task
        is not awaited (not scheduled, cancelled, or arrived before)."""
        if task not in self.outstanding:
            return False
        self.pending[task] = (self.outstanding.pop(task), item)
        return True

    def cancel(self, task: str) -> Any:
        """Stop awaiting `task`; the item that was waiting for it, if any."""
        self.outstanding.pop(task, None)
        waiting = self.pending.pop(task, None)
        return None if waiting is None else waiting[1]

    def next(self, timer: float | None = None) -> Event | None:
        """The next event that may happen now, taken out (its time becomes `now`): the
        earliest waiting update when no outstanding task finishes before it, or the timer
        when nothing outstanding or waiting finishes at or before it; else None."""
        head = min(((t, task) for task, (t, _) in self.pending.items()), default=None)
        horizon = min(((t, task) for task, t in self.outstanding.items()), default=None)
        if (
            timer is not None
            and (head is None or timer < head[0])
            and (horizon is None or timer < horizon[0])
        ):
            self.now = max(self.now, timer)
            return Event(self.now, "")
        if head is not None and (horizon is None or head < horizon):
            at, task = head
            _, item = self.pending.pop(task)
            self.now = max(self.now, at)
            return Event(at, task, item)
        return None

    def state_dict(self) -> dict[str, Any]:
        # Waiting updates are not saved: their workers push them again after a restart.
        return {"now": self.now}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.now = _load_now(state)


def simulated_duration(
    seconds: float, dropout: float, drew: Callable[[int], float], mode: str, timeout: float
) -> float:
    """A task's simulated time to its update, counting the attempts its client drops first.

    `seconds`: one attempt (the population's duration); attempt a (0, 1, ...) drops when
    `drew(a)` < `dropout`, as the worker decides (client/pacing.py). A dropped attempt costs
    half an attempt (it fails part-way, half-way on average) under DROPOUT_MODE=abort, and
    TASK_TIMEOUT under silent (its lease runs out); the next attempt starts then."""
    total, attempt = 0.0, 0
    while dropout > 0 and drew(attempt) < dropout and attempt < 1000:
        total += seconds / 2 if mode == "abort" else timeout
        attempt += 1
    return total + seconds


def task_durations(
    settings: Any, population: Population, clients: Mapping[int, Client]
) -> Duration:
    """Each training task's simulated seconds: its client's duration for the task's samples
    (one slice under PARTITION=slices), weights pulled and pushed as float32, with the
    attempts its client drops first (seeded from the task, as the worker draws them)."""
    per_sample = SECONDS_PER_SAMPLE[settings.model]
    nbytes = 4.0 * parameter_count(settings.model)

    def duration(number: int, task_id: str) -> float:
        client = clients[number]
        samples = client.samples // len(client.slice_numbers) if client.slices else client.samples
        one = population.duration(client.id, samples, settings.epochs, nbytes, nbytes, per_sample)
        seed = task_seed(settings.seed, task_id)
        return simulated_duration(
            one,
            population.client(client.id).dropout,
            lambda attempt: drop_draw(seed, attempt),
            settings.dropout_mode,
            settings.task_timeout,
        )

    return duration
