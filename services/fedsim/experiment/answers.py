"""The aggregator's answers as a watcher reads them: `/v1/status`, then a page of `/v1/history`.

A poll reads the status first, then only the history's versions after a cursor, as
the dashboard does (aggregator/dashboard/static/dashboard.js): the cursor is the
lowest of the highest version held, the status' version, and one below each version
still being scored (`evaluations_pending`), so a score that comes out of order is
read again and none is missed; a status version below the highest held (a restart
lost versions) starts the history again. The sizes of the last status answer and the last
history page are kept: they are what one poll of a long run costs, and runs.csv
reports them (`status_bytes`, `history_bytes`) to show that they stay bounded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

PAGE = 1000  # the dashboard's page of history entries


class Answers:
    """The history a watcher holds, read by polls of `url`; `get(url)` is a body or None."""

    def __init__(
        self,
        url: str,
        get: Callable[[str], bytes | None],
        *,
        every: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url, self.get, self.every, self.clock = url.rstrip("/"), get, every, clock
        self.held: dict[int, dict[str, Any]] = {}
        self.cursor: int | None = None  # the next page's `after`; None: from the start
        self.status_bytes: int | None = None
        self.history_bytes: int | None = None
        self.more = False  # the last page was full: `next` names a page after it
        self._last: float | None = None

    def entries(self) -> list[dict[str, Any]]:
        """The history held, oldest version first, after a poll when one is due."""
        now = self.clock()
        if self._last is None or now - self._last >= self.every:
            self._last = now
            self.poll()
        return self.history()

    def history(self) -> list[dict[str, Any]]:
        """The history held, oldest version first (no poll)."""
        return [self.held[v] for v in sorted(self.held)]

    def poll(self) -> bool:
        """One status answer and one history page; False when either did not come (the
        aggregator busy or gone), nothing held changed then."""
        status = self.get(self.url + "/v1/status")
        after = "" if self.cursor is None else f"&after={self.cursor}"
        page = self.get(f"{self.url}/v1/history?limit={PAGE}{after}")
        if status is None or page is None:
            return False
        try:
            st, answer = json.loads(status), json.loads(page)
            found = answer["history"]
        except (ValueError, KeyError, TypeError):
            return False
        self.more = "next" in answer
        self.status_bytes, self.history_bytes = len(status), len(page)
        version = st.get("version")
        if isinstance(version, int) and self.held and version < max(self.held):
            # A restart lost the versions above its checkpoint and makes them again: the
            # next poll reads the history from the start.
            self.held, self.cursor = {}, None
            return True
        for entry in found:
            if isinstance(entry, dict) and isinstance(entry.get("version"), int):
                self.held[entry["version"]] = entry
        top = max(self.held, default=-1)
        pending = [v - 1 for v in st.get("evaluations_pending") or [] if isinstance(v, int)]
        nxt = min(top, *([version] if isinstance(version, int) else []), *pending)
        self.cursor = nxt if nxt >= 0 else None
        return True

    def drain(self, polls: int = 100) -> None:
        """Poll until a page is the last (the whole history held), at most `polls` times."""
        for _ in range(polls):
            if not self.poll() or not self.more:
                return
