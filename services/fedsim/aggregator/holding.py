"""Held requests for work: an idle worker's ask waits here until something changes.

Without it a worker that finds no task (the round is closing on another worker's
last client, an evaluation is pending) sleeps 0.2, 0.4, 0.8 s ... before asking
again, and the next round's tasks wait for it: with the mlp's tasks of a tenth of
a second, those sleeps were a large share of a run's time outside training.

`Holds.ask` answers at once when there is work, the run is over or the worker is
surplus; otherwise it waits (at most `seconds`) for the next change the app
reports (`changed()`: after every request that changes state, and on each tick of
the background clock) and asks again. A change counter closes the gap between an
empty answer and the wait: a change in that gap ends the wait at once. Only
`slots` asks wait at the same time, so the gunicorn threads they hold never starve
the uploads that end the wait; the others are answered at once as before.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from fedsim.protocol import Offer

HOLD_SECONDS = 1.0  # the longest an ask waits; the worker asks again at once after it
HOLD_SLOTS = 4  # asks held at the same time: half of gunicorn's 8 threads by default


def slots_for(threads: str | None) -> int:
    """Half of gunicorn's request threads (THREADS, as gunicorn_conf reads it) may hold
    asks; the other half serve the uploads and scores that end the waits."""
    return int(threads) // 2 if threads and threads.strip().isdigit() else HOLD_SLOTS


class Holds:
    def __init__(
        self,
        seconds: float = HOLD_SECONDS,
        slots: int = HOLD_SLOTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.seconds = seconds
        self._changed = threading.Condition()
        self._generation = 0
        self.held = 0  # asks waiting now
        self._slots = threading.BoundedSemaphore(slots) if slots > 0 else None
        self._clock = clock

    def changed(self) -> None:
        """Something a waiting ask may be waiting for happened: wake them to look."""
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def ask(self, ask: Callable[[], tuple[Offer, str]]) -> tuple[Offer, str, bool]:
        """`ask()`'s answer, after waiting up to `self.seconds` for one with work when it
        had none; and whether the ask was held (then the worker need not wait to ask again)."""
        seconds = self.seconds
        with self._changed:
            seen = self._generation
        offer, name = ask()
        if _final(offer) or seconds <= 0 or self._slots is None:
            return offer, name, False
        if not self._slots.acquire(blocking=False):
            return offer, name, False
        with self._changed:
            self.held += 1
        try:
            deadline = self._clock() + seconds
            while True:
                with self._changed:
                    while self._generation == seen:
                        left = deadline - self._clock()
                        if left <= 0:
                            return offer, name, True
                        self._changed.wait(left)
                    seen = self._generation
                offer, name = ask()
                if _final(offer):
                    return offer, name, True
        finally:
            with self._changed:
                self.held -= 1
            self._slots.release()


def _final(offer: Offer) -> bool:
    return offer.task is not None or offer.finished or offer.surplus
