"""Evaluation bookkeeping: the versions waiting for a worker to score them, and the history.

Each version that calls for a score (every round; every EVAL_EVERY versions
under asynchronous rules; the final one) waits as one `Waiting` record: the
snapshot to serve, and what its history entry will say. A waiting version holds
a model in memory, so at most MAX_WAITING_EVALUATIONS wait: when workers score
slower than versions are made (or none is left), the oldest is dropped
unscored. A worker's score becomes the version's entry in the history
(history.py). The caller holds the state's lock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedsim.aggregator import history, privacy, tasks
from fedsim.aggregator.events import Events
from fedsim.aggregator.metrics import Recorder
from fedsim.aggregator.snapshot import Snapshot
from fedsim.aggregator.strategies import Refused
from fedsim.config import Settings

log = logging.getLogger("fedsim.aggregator")

MAX_WAITING_EVALUATIONS = 8  # versions kept in memory until a worker scores them


@dataclass(frozen=True)
class Waiting:
    """A version waiting for its score, and what its history entry will say."""

    snapshot: Snapshot
    round: int | None  # the round that made it; None under asynchronous rules, or at start
    updates: int  # updates aggregated up to it
    clients: list[str] = field(default_factory=list)  # in the versions since the last scored
    rounds_closed: int = 0  # rounds closed when it was made (DP: epsilon composes them)
    sim_seconds: float | None = None  # the run's clock when it was made (simulated time)


class Core(Protocol):
    """What the evaluations use of the state."""

    settings: Settings
    queue: tasks.Queue
    snapshot: Snapshot
    events: Events
    metrics: Recorder

    def stamp(self) -> str: ...


class Evaluations:
    """The waiting versions and the history entries of the scored ones."""

    def __init__(self, core: Core, entries: list[dict[str, Any]], attackers: list[str]) -> None:
        self._core, self._attackers = core, attackers
        self.waiting: dict[int, Waiting] = {}
        self.entries = list(entries)  # by version, one per version
        self._since: list[str] = []  # clients in the versions since the last waiting one

    def __len__(self) -> int:
        return len(self.waiting)

    def snapshot_of(self, version: int) -> Snapshot | None:
        waiting = self.waiting.get(version)
        return waiting.snapshot if waiting else None

    def scored(self, version: int) -> bool:
        return any(e["version"] == version for e in self.entries)

    def pending(self) -> dict[str, Any]:
        """What a checkpoint keeps of the entries to come: the current version's round, the
        clients of each version waiting for its score, and those since the last one waiting.
        Caller holds the state's lock."""
        current = self.waiting.get(self._core.snapshot.version)
        return {
            "round": current.round if current else None,
            "waiting": {str(v): list(w.clients) for v, w in self.waiting.items()},
            "since": list(self._since),
        }

    def restore(self, pending: dict[str, Any]) -> int | None:
        """Take back a checkpoint's `pending()`. A restart scores only the checkpoint's
        version, so the clients of every version still unscored (some may have been scored
        after the checkpoint was written) go into the next entry. Returns the round that made
        the checkpoint's version (None: none, or not kept)."""
        waiting = pending.get("waiting", {})
        unscored = [c for v, cs in waiting.items() if not self.scored(int(v)) for c in cs]
        self._since = sorted(set(unscored) | set(pending.get("since", [])))
        return pending.get("round")

    def saw(self, client_id: str) -> None:
        """`client_id`'s update went into a version: its next history entry names it."""
        self._since.append(client_id)

    def want(self, snap: Snapshot, round_no: int | None, updates: int) -> None:
        """Queue a score of `snap`; drop the oldest waiting beyond MAX_WAITING_EVALUATIONS."""
        closed = privacy.rounds_done(self._core)  # at start: the checkpoint's, as it was made
        at = self._core.queue.run_clock()  # CLOCK=virtual: simulated seconds
        self.waiting[snap.version] = Waiting(
            snap, round_no, updates, sorted(set(self._since)), closed, round(at, 3)
        )
        self._since = []
        self._core.queue.want_evaluation(snap.version)
        for version in self._core.queue.drop_evaluations(keep=MAX_WAITING_EVALUATIONS):
            self.waiting.pop(version, None)
            log.warning(
                "evaluation of v%d skipped: %d newer versions wait for theirs",
                version,
                MAX_WAITING_EVALUATIONS,
            )

    def record(
        self, task_id: str, lease: str, accuracy: float, loss: float, worker: str
    ) -> dict[str, Any]:
        """Write a worker's score of a version as its history entry; stop waiting for it.

        Raises Refused when the score is not wanted (the queue says why), or (503)
        when the history cannot be written; the version then still waits, so the
        worker's retry records the same entry.
        """
        core = self._core
        version = core.queue.check_evaluation(task_id, lease)
        record = core.queue.workers.get(worker)
        worker = record.name if record is not None else worker
        entry = self._entry(version, accuracy, loss)
        try:
            history.append(core.settings.model_dir, entry)
        except OSError as exc:
            raise Refused(
                "unavailable",
                f"the history cannot be written ({exc.strerror or exc}); try again later",
                status=503,
            ) from None
        # A version re-made after a restart replaces its earlier entry.
        self.entries = [e for e in self.entries if e["version"] != version] + [entry]
        self.entries.sort(key=lambda e: e["version"])
        core.queue.record_evaluation(task_id, lease, version)
        core.metrics.task_finished("evaluate")
        self.waiting.pop(version, None)
        where = f"round {entry['round']} (v{version})" if entry["round"] else f"v{version}"
        log.info(
            "evaluation of %s by %s: test accuracy %.4f, loss %.4f", where, worker, accuracy, loss
        )
        core.events.add("evaluation", f"{where}: test accuracy {accuracy:.4f}, loss {loss:.4f}")
        if core.queue.finished:
            log.info("the run is finished at version %d", core.snapshot.version)
            core.events.add("finished", f"run finished at version {core.snapshot.version}")
            core.metrics.set_finished(True)
        core.metrics.evaluation(accuracy=accuracy, loss=loss, version=version)
        return entry

    def _entry(self, version: int, accuracy: float, loss: float) -> dict[str, Any]:
        """The history entry of `version`'s score (history.py gives its fields)."""
        waiting = self.waiting.get(version)
        entry: dict[str, Any] = {
            "version": version,
            "round": waiting.round if waiting else None,
            "time": self._core.stamp(),
            "accuracy": round(float(accuracy), 6),
            "loss": round(float(loss), 6),
            "samples": waiting.snapshot.samples if waiting else None,
            "updates": waiting.updates if waiting else None,
            "clients": list(waiting.clients) if waiting else [],
            "sim_seconds": waiting.sim_seconds if waiting else None,
        }
        if self._attackers:
            entry["attackers"] = [c for c in entry["clients"] if c in self._attackers]
        account = getattr(self._core, "privacy", None)
        if account is not None:  # epsilon after the rounds closed up to this version (null: none)
            closed = waiting.rounds_closed if waiting else privacy.rounds_done(self._core)
            entry["epsilon"] = privacy.shown(account.epsilon(closed))
            entry["delta"] = account.delta
        return entry

    def page(self, after: int = -1, limit: int | None = None) -> list[dict[str, Any]]:
        """Copies of the entries of versions after `after`, in order: all, or the first
        `limit` + 1 (a page, and whether more follow), only those copied."""
        chosen = sorted((e for e in self.entries if e["version"] > after), key=_version)
        return [dict(e) for e in chosen[: None if limit is None else limit + 1]]

    def last(self) -> dict[str, Any] | None:
        return self.entries[-1] if self.entries else None


def _version(entry: dict[str, Any]) -> int:
    return entry["version"]
