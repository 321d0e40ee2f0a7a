"""The sweep's progress on one line: a bar for the run, a bar for the sweep, the time left.

    run 3/8 [####------] round 4/10 | sweep [###-------] 31% | about 2m10s left | fedprox seed 2

Work is counted in rounds (a run's expected rounds: ROUNDS, or one pass over
the slices), so a sweep of cells of different lengths advances fairly. The time
left is the rounds left at the pace of this session's runs so far, start-ups
and evaluations included. On a terminal the line is redrawn in place; in a log
(not a terminal) only each run's start and outcome are printed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def bar(fraction: float, width: int = 10) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def duration(seconds: float) -> str:
    """71 -> 1m11s, 3725 -> 1h02m."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    def __init__(
        self,
        runs: int,
        rounds: float,
        *,
        out: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        tty: bool | None = None,
    ) -> None:
        self.runs, self.total = runs, rounds
        self.out = out or sys.stderr
        self.tty = self.out.isatty() if tty is None else tty
        self.clock = clock
        self.done = 0.0  # rounds of finished runs (kept ones included)
        self.session = 0.0  # rounds run in this session, for the pace
        self.started: float | None = None
        self.number, self.label, self.expected, self.at = 0, "", 1.0, 0.0

    def skip(self, rounds: float) -> None:
        """A run kept from an earlier session."""
        self.number += 1
        self.done += rounds

    def begin(self, label: str, rounds: float) -> None:
        self.number += 1
        self.label, self.expected, self.at = label, max(rounds, 1e-9), 0.0
        if self.started is None:
            self.started = self.clock()
        if not self.tty:
            self._print(f"run {self.number}/{self.runs}: {label}")
        else:
            self._draw()

    def entry(self, x: float) -> None:
        """An evaluation at `x` rounds of the current run."""
        self.at = min(x, self.expected)
        if self.tty:
            self._draw()

    def end(self, outcome: str) -> None:
        self.done += self.expected
        self.session += self.expected
        self.at = 0.0
        if self.tty:
            self.out.write("\r\033[K")
        self._print(f"run {self.number}/{self.runs} {outcome}")

    def left(self) -> float | None:
        """Seconds left at this session's pace; None before any round is done."""
        ran = self.session + self.at
        if self.started is None or ran <= 0:
            return None
        pace = (self.clock() - self.started) / ran
        return max(0.0, self.total - self.done - self.at) * pace

    def line(self) -> str:
        sweep = (self.done + self.at) / self.total if self.total else 1.0
        left = self.left()
        return (
            f"run {self.number}/{self.runs} {bar(self.at / self.expected)} "
            f"round {self.at:g}/{self.expected:g} | sweep {bar(sweep)} {sweep:.0%} | "
            + ("estimating time left" if left is None else f"about {duration(left)} left")
            + f" | {self.label}"
        )

    def _draw(self) -> None:
        self.out.write("\r\033[K" + self.line())
        self.out.flush()

    def _print(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()
