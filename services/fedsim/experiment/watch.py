"""What both engines share: a run to do (`Job`), the loop that follows it, and its failure.

The loop reads the run's history as it grows, tells the progress display about
each new evaluation, notes the memory in use when it arrived, and ends the run
when the workers are done, when the target is reached (stop = "target"), or at
the timeout.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POLL_SECONDS = 0.5  # how often the history and the workers are looked at


class RunFailed(RuntimeError):
    """A run could not be done; the message is one line and says where its logs are."""


@dataclass(frozen=True)
class Job:
    """One run: a cell's settings with one seed, in its own folder."""

    settings: dict[str, str]  # the cell's settings and SEED
    seed: int
    workers: int
    label: str  # RUN_LABEL: the dashboard shows it
    folder: Path  # logs, history, settings.json, result.json
    per_round: int
    expected_rounds: float
    target: float | None
    stop: str  # rounds | target
    timeout: float  # 0: none

    @property
    def logs(self) -> Path:
        return self.folder / "logs"


def tail(path: Path, lines: int = 5) -> str:
    """The last lines of a log, joined with ' | ' (an error message stays one line)."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def load() -> float:
    """The machine's 1-minute load average now, to two decimals."""
    return round(os.getloadavg()[0], 2)


def follow(
    job: Job,
    *,
    entries: Callable[[], list[dict[str, Any]]],
    done: Callable[[], bool],
    memory: Callable[[], Mapping[str, int]],
    on_entry: Callable[[dict[str, Any]], None],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[str, list[dict[str, Any]], dict[int, dict[str, int]]]:
    """Until the run ends: its status (finished, target, timeout), history and memory at
    each version, by process (`memory()`: {"aggregator": bytes, "worker-1": bytes, ...}).
    `done()` is true once the workers are done; it raises RunFailed."""
    started = clock()
    seen: dict[int, dict[str, int]] = {}
    found: list[dict[str, Any]] = []
    while True:
        finished = done()
        found = entries()
        for entry in found:
            if entry["version"] not in seen:
                seen[entry["version"]] = dict(memory())
                on_entry(entry)
        if finished:
            return "finished", found, seen
        target = job.target if job.stop == "target" else None
        if target is not None and any(e["version"] > 0 and e["accuracy"] >= target for e in found):
            return "target", found, seen
        if job.timeout and clock() - started > job.timeout:
            return "timeout", found, seen
        sleep(POLL_SECONDS)
