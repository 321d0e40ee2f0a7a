"""Rounds under the virtual clock: a RoundQueue whose rounds open, arrive and close in
simulated time (CLOCK=virtual, round rules; the asynchronous rules' model is flights.py).
The clock itself, its events and the task durations are in clock.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fedsim.aggregator.tasks.clock import Duration, Event, VirtualClock

if TYPE_CHECKING:
    from fedsim.aggregator.tasks.rounds import RoundQueue


class Rounds:
    """A RoundQueue under the virtual clock: rounds open, arrive and close in simulated time.

    `deliver(item, at)` puts a released update into the open round (`add_update`, without
    closing it); `end(why, at)` closes the open round, or retries it when `why` is RETRY.
    Call `sync` before handing out tasks, so a round opens at its simulated time.
    """

    def __init__(
        self,
        queue: RoundQueue,
        clock: VirtualClock,
        duration: Duration,
        deliver: Callable[[Any, float], None],
        end: Callable[[str, float], None],
    ) -> None:
        self.queue, self.clock, self.duration = queue, clock, duration
        self.deliver, self.end = deliver, end
        self._scheduled: tuple[int, int] | None = None  # (round, attempt) whose tasks are awaited

    def sync(self, version: int) -> None:
        """Open the next round at the simulated now when none is open, and await the open
        attempt's tasks (from its opening); stop awaiting any other task."""
        q, clock = self.queue, self.clock
        r = q.open_round(version, clock.now)
        if r is None:
            return
        if r.opened_at is None:
            r.opened_at = clock.now
        if self._scheduled == (r.number, r.attempt):
            return
        # Resumed mid-round: the updates not in the round yet are taken again from its
        # opening (a checkpoint does not hold them), so its simulated time goes back to its
        # last update in (a journal's replay puts them back), or to its opening.
        clock.now = min(clock.now, r.opened_at + max(r.arrivals, default=0.0))
        wanted = {r.task(n) for n in r.sampled if n not in r.updates}
        for task in [*clock.outstanding, *clock.pending]:
            if task not in wanted:
                clock.cancel(task)
        for n in r.sampled:
            task = r.task(n)
            if task in wanted:
                clock.schedule(task, r.opened_at, self.duration(n, task))
        self._scheduled = (r.number, r.attempt)

    def arrive(self, task: str, item: Any, version: Callable[[], int]) -> bool:
        """An update of `task` arrived: it waits for its turn, then every event now due is
        taken, in simulated order (`version()` is the current version). False when the task
        is not awaited (arrived before, or no longer wanted): nothing is taken then."""
        self.sync(version())
        if not self.clock.arrive(task, item):
            return False
        self.run(version)
        return True

    def run(self, version: Callable[[], int]) -> list[Event]:
        """Take every event that may happen now, in simulated order."""
        done: list[Event] = []
        while True:
            self.sync(version())
            q = self.queue
            if q.round is None:  # the run is over
                return done
            event = self.clock.next(q.deadline())
            if event is None:
                return done
            done.append(event)
            if event.timer:
                why = q.due(event.at)
                if why is not None:
                    self.end(why, event.at)
                continue
            self.deliver(event.item, event.at)
            why = q.due(event.at)
            if why is not None:
                self.end(why, event.at)
