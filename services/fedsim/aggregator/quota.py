"""What one admitted client may contribute: its partition's samples per window (429 beyond).

A token admits a client; the robust rules (median, trimmed-mean, krum) are the
defence against many bad clients. This is the limit on what one admitted client
can do, however often it pushes:

- **Round rules**: a client contributes at most one task's samples to a round.
  The plan holds that already: a round hands each sampled client one task,
  counts its result once with at most the task's images (tasks/queues.py), and
  takes no update without a task, so nothing is counted here.
- **Asynchronous rules**: a client contributes at most its partition's samples
  to any CLIENT_QUOTA_VERSIONS consecutive versions: the samples of the updates
  taken while the version was v - CLIENT_QUOTA_VERSIONS + 1 .. v. A planned
  client's partition is its part of the plan (partitions.json); a client outside
  the plan (a hand-started client's own id) is allowed as much as the largest
  planned client, and at least NUM_IMAGES_TRAIN, the most one update without a
  task may claim. The results of tasks count towards it but are never refused
  (the aggregator handed them out); an update without a task that would go over
  gets 429 with Retry-After, the seconds the versions it must wait for took so
  far, and one larger than the whole share 422.

The counts live in memory: a restart starts every window afresh.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping

from fedsim.aggregator.strategies import Refused, Update
from fedsim.aggregator.tasks import Client
from fedsim.aggregator.tasks.roster import Roster
from fedsim.config import Settings

MAX_CLIENTS = 100_000  # clients whose recent updates are kept; the least recent go first
PACE_VERSIONS = 64  # versions whose first sight is kept to estimate the seconds per version
DEFAULT_PACE = 5.0  # seconds per version assumed before two versions were seen
MAX_RETRY_AFTER = 3600


class OverQuota(Refused):
    """429: the client's share of the window is used up; `retry_after` seconds is a hint."""

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__("over_quota", reason, status=429)
        self.retry_after = retry_after


class Quota:
    """Per client, the (version, samples) of its updates still in the window."""

    def __init__(
        self,
        *,
        versions: int,
        shares: Mapping[str, int],
        outside: int,
        mode: str,
        clock: Callable[[], float],
    ) -> None:
        self.versions, self.shares, self.outside = versions, shares, outside
        self.active = mode == "async"  # round rules: the plan is the quota (module docstring)
        self._clock = clock
        self._taken: OrderedDict[str, deque[tuple[int, int]]] = OrderedDict()
        self._pace: deque[tuple[int, float]] = deque(maxlen=PACE_VERSIONS)

    @classmethod
    def of(
        cls, clients: Iterable[Client], settings: Settings, mode: str, clock: Callable[[], float]
    ) -> Quota:
        """The quota of the plan's `clients` under CLIENT_QUOTA_VERSIONS, for a rule of `mode`.
        A roster's shares are read from its samples column, not copied per client."""
        shares: Mapping[str, int] = (
            clients.samples_by_id
            if isinstance(clients, Roster)
            else {c.id: c.samples for c in clients}
        )
        outside = max([settings.num_images_train, *shares.values()])
        return cls(
            versions=settings.client_quota_versions,
            shares=shares,
            outside=outside,
            mode=mode,
            clock=clock,
        )

    def share(self, client_id: str) -> int:
        """The samples `client_id` may contribute to one window."""
        return self.shares.get(client_id, self.outside)

    def used(self, client_id: str, version: int) -> int:
        """The samples `client_id` contributed to the window that ends at `version`."""
        return sum(n for v, n in self._taken.get(client_id, ()) if v > version - self.versions)

    @contextlib.contextmanager
    def charge(self, update: Update, version: int) -> Iterator[None]:
        """Count `update`, taken at `version`, for its client while the block runs; refuse it
        (nothing is counted) when it is over the client's share. Raises OverQuota (429) or
        Refused (422); a Refused raised in the block takes the count back."""
        if not self.active:
            yield
            return
        self._see(version)
        client = update.client_id
        taken = self._taken.setdefault(client, deque())
        self._taken.move_to_end(client)
        while taken and taken[0][0] <= version - self.versions:
            taken.popleft()
        if update.task_id is None:
            self._check(update, version, taken)
        entry = (version, update.num_samples)
        taken.append(entry)
        while len(self._taken) > MAX_CLIENTS:
            self._taken.popitem(last=False)
        try:
            yield
        except Refused:
            with contextlib.suppress(ValueError):
                taken.remove(entry)
            raise

    def _check(self, update: Update, version: int, taken: deque[tuple[int, int]]) -> None:
        share, n = self.share(update.client_id), update.num_samples
        window = f"{self.versions} consecutive versions (CLIENT_QUOTA_VERSIONS)"
        if n > share:
            raise Refused(
                "bad_num_samples",
                f"num_samples={n} is more than client {update.client_id}'s share of "
                f"{share} samples in any {window}",
                status=422,
            )
        used = sum(s for _, s in taken)
        if used + n <= share:
            return
        # Wait until enough of the oldest updates leave the window: the one at version v
        # leaves once the version reaches v + versions.
        free, wait = share - n, 0
        for v, s in taken:
            used -= s
            wait = v + self.versions - version
            if used <= free:
                break
        seconds = max(1, min(MAX_RETRY_AFTER, math.ceil(wait * self._seconds_per_version())))
        raise OverQuota(
            f"client {update.client_id} contributed {sum(s for _, s in taken)} samples to the "
            f"last {window}, and this update's {n} would take it past its share of {share}; "
            f"it fits again {wait} versions from now",
            seconds,
        )

    def _see(self, version: int) -> None:
        if not self._pace or self._pace[-1][0] < version:
            self._pace.append((version, self._clock()))

    def _seconds_per_version(self) -> float:
        if len(self._pace) < 2:
            return DEFAULT_PACE
        (v0, t0), (v1, t1) = self._pace[0], self._pace[-1]
        return max(0.0, t1 - t0) / (v1 - v0)
