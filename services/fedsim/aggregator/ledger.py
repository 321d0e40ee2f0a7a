"""The update ledger: which updates were aggregated, under which number, and how far that is saved.

Every aggregated update gets the next sequence number (1, 2, ...; `total` is
the last). The ids of the newest REMEMBERED_IDS are kept with (version that
included it, its number): this is how a repeated id is recognised. A
checkpoint saves the newest SAVED_IDS of them (at most SAVED_IDS_BYTES of
JSON, as a checkpoint header must stay under 64 kB), so a retry is still
recognised after a restart; the ids restored are then numbers
`total - len(ids) + 1 .. total`, in the checkpoint's version.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections import OrderedDict
from itertools import accumulate, islice

REMEMBERED_IDS = 100_000  # applied update ids kept in memory for dedup (~15 MB at most)
SAVED_IDS = 256  # the most recent of them saved in a checkpoint, for dedup after a restart
SAVED_IDS_BYTES = 24_000  # and at most this much JSON: a checkpoint header must stay < 64 kB


class Ledger:
    """Applied update ids -> (version, number), the count, and the last checkpoint's marks."""

    def __init__(self, ids: list[str], total: int, version: int, saved_at: str) -> None:
        first = total - len(ids) + 1
        self._applied: OrderedDict[str, tuple[int, int]] = OrderedDict(
            (update_id, (version, first + i)) for i, update_id in enumerate(ids)
        )
        self.total = total  # updates aggregated since the run began
        self.saved_version, self.saved_total = version, total  # what the last checkpoint holds
        self.last_checkpoint = {"version": version, "time": saved_at}

    def get(self, update_id: str) -> tuple[int, int] | None:
        """(version, number) of an applied update, or None when not remembered."""
        return self._applied.get(update_id)

    def number(self, update_id: str) -> int | None:
        known = self._applied.get(update_id)
        return known[1] if known else None

    def add(self, update_id: str, version: int) -> int:
        """Count an update aggregated into `version`; its number. The oldest id is forgotten
        beyond REMEMBERED_IDS."""
        self.total += 1
        self._applied[update_id] = (version, self.total)
        while len(self._applied) > REMEMBERED_IDS:
            self._applied.popitem(last=False)
        return self.total

    def first(self) -> int:
        """The number of the oldest id remembered (total + 1 when none is)."""
        return next(iter(self._applied.values()))[1] if self._applied else self.total + 1

    def unsaved(self) -> int:
        return self.total - self.saved_total

    def recent(self) -> list[str]:
        """The newest ids, oldest first, that a checkpoint keeps: at most SAVED_IDS of them and
        SAVED_IDS_BYTES of JSON (2 + sum of len(json(id)) + 2)."""
        newest = list(islice(reversed(self._applied), SAVED_IDS))
        joined = "".join(newest)
        if joined.isascii() and joined.isprintable() and '"' not in joined and "\\" not in joined:
            sizes = [len(update_id) + 4 for update_id in newest]  # nothing escaped: quotes, ", "
        else:
            sizes = [len(json.dumps(update_id)) + 2 for update_id in newest]
        fits = bisect_right(list(accumulate(sizes, initial=2)), SAVED_IDS_BYTES) - 1
        return newest[:fits][::-1]

    def saved(self, version: int, total: int, time: str) -> None:
        """A checkpoint of `version`, holding the first `total` updates, was written at `time`."""
        self.saved_version, self.saved_total = version, total
        self.last_checkpoint = {"version": version, "time": time}
