"""The recent events of the run (restart, rounds, checkpoints, refusals), shown by /v1/status
and the dashboard."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

EVENTS = 50  # recent events shown by /v1/status and the dashboard


def iso(ts: float) -> str:
    """Unix time as ISO 8601 in UTC, to the second."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


class Events:
    """The newest EVENTS things that happened, each {"time", "kind", "text"}."""

    def __init__(self, wall: Callable[[], float]) -> None:
        self._wall = wall
        self._items: deque[dict[str, Any]] = deque(maxlen=EVENTS)

    def add(self, kind: str, text: str) -> None:
        self._items.append({"time": iso(self._wall()), "kind": kind, "text": text})

    def rows(self) -> list[dict[str, Any]]:
        return list(self._items)
