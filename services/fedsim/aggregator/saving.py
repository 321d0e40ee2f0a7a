"""When a checkpoint is written, and the writing of it.

A checkpoint is due when something is unsaved (a newer version, or a change to
a buffering rule's held updates) and one of these holds, in this order:
shutdown; a retry after a failed write; the run finished; SAVE_MODEL updates
aggregated since the last one (updates, not versions: a round is one version
of several updates); IDLE_SAVE_SECONDS without a change.

It is written outside the state's lock (under `_save_lock`, which only
serialises disk writes), from a consistent view captured under it. While a
write fails, `disk_error` says why and new updates are refused (503) until one
succeeds: an update acknowledged but never saved could be lost.

Under DURABLE=true the saver also keeps the journal (journal.py): the intake
logs each update the rule takes and each round it closes (`log_update`,
`log_close`, under the state's lock), `sync` returns once they are fsynced (the
state acknowledges an update only then), a checkpoint saves how far it covers
the journal (`journal_seq`) and cuts what it covers off it. Without DURABLE a
journal left by a run that had it is replayed at start, then `settle` writes a
checkpoint of the replayed state at once and removes the journal: nothing is
journaled after that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from fedsim import checkpoints, pipeline, weights
from fedsim.aggregator import tasks
from fedsim.aggregator.evaluations import Evaluations
from fedsim.aggregator.events import Events, iso
from fedsim.aggregator.journal import Journal
from fedsim.aggregator.ledger import Ledger
from fedsim.aggregator.metrics import Recorder
from fedsim.aggregator.snapshot import Snapshot
from fedsim.aggregator.strategies import Global, Refused, Strategy, Update
from fedsim.aggregator.tasks.flights import BASE_TENSORS
from fedsim.config import Settings

log = logging.getLogger("fedsim.aggregator")

BASE = "base/"  # the prefix of a base model's tensors in a journal record
COVERED = "journal_seq"  # the checkpoint metadata: the journal records it holds


class Core(Protocol):
    """What a checkpoint is made of, read from the state under its lock."""

    settings: Settings
    snapshot: Snapshot
    strategy: Strategy
    queue: tasks.Queue
    ledger: Ledger
    held: list[Update]
    events: Events
    metrics: Recorder
    stages: pipeline.Pipeline
    evaluations: Evaluations


@dataclass(frozen=True)
class _View:
    snapshot: Snapshot
    metadata: dict[str, object]
    updates_total: int
    rule_tensors: dict[str, np.ndarray]  # the rule's server state, beside the model's
    covered: int  # the journal records up to this number are in it


class Saver:
    """The checkpoint schedule of one state, and its writes."""

    def __init__(
        self,
        core: Core,
        lock: threading.Lock,
        clock: Callable[[], float],
        wall: Callable[[], float],
    ) -> None:
        self._core, self._lock, self._clock, self._wall = core, lock, clock, wall
        self._save_lock = threading.Lock()
        self._save_wanted = False
        self.disk_error: str | None = None  # why the last checkpoint write failed, until one works
        self._changed_at = clock()
        self._held_changed = False  # a buffering rule's held updates changed since the last write
        # The journal (replay.py opens it at start), the records the newest checkpoint holds,
        # and the version of the newest checkpoint taken: an update trained from an older
        # version has its base model logged with it, as a replay could not find it.
        self.journal: Journal | None = None
        self.replaying = False
        self.covered = 0
        self._floor = core.snapshot.version
        self._leftover: Path | None = None  # a replayed journal, removed once a checkpoint holds it

    def changed(self, now: float, *, held: bool = False) -> None:
        """Something to save happened at `now` (the idle timer restarts). Caller holds the lock."""
        self._changed_at = now
        self._held_changed = self._held_changed or held

    def log_update(self, update: Update, *, step: bool, base: Global | None = None) -> None:
        """Journal an update the rule took (step: its state now holds it; False for one
        waiting in a round), with the base model it was measured against when that is older
        than the newest checkpoint. Caller holds the lock."""
        journal = self.journal
        if journal is None or self.replaying:
            return
        fields = {
            f.name: getattr(update, f.name)
            for f in dataclasses.fields(update)
            if f.name not in ("tensors", "lease")
        }
        fields["meta"] = dict(update.meta)
        fields["base_used"] = base is not None
        fields["at"] = self._core.queue.run_clock()  # when it was taken, on the run's clock
        opened = getattr(getattr(self._core.queue, "round", None), "opened_at", None)
        if opened is not None:
            fields["opened_at"] = opened  # its round's opening, on the same clock
        tensors = dict(update.tensors)
        if base is not None and base.version < self._floor:
            tensors.update({BASE + name: t for name, t in base.tensors.items()})
            fields["base_samples"] = base.samples
        journal.append("update", fields, tensors, step=step)

    def log_close(self, round_no: int, *, attempt: int = 1, retry: bool = False) -> None:
        """Journal that attempt `attempt` of round `round_no` closed, or ended to be tried
        again (`retry`). Caller holds the lock."""
        if self.journal is not None and not self.replaying:
            fields = {"round": round_no, "attempt": attempt, "retry": retry}
            self.journal.append("close", fields, step=True)

    def sync(self) -> None:
        """Return once every change journaled so far is fsynced (at once without a journal).
        Raises Refused (503) when the journal cannot be written: the update is then not
        acknowledged; its retry is, as a duplicate, once a write succeeds."""
        journal = self.journal
        if journal is None:
            return
        try:
            journal.commit()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            log.error("journal %s could not be written (%s)", journal.path, reason)
            raise Refused(
                "unavailable",
                f"the journal cannot be written ({reason}); try again later",
                status=503,
            ) from None

    def reason(self, now: float, force: bool) -> str | None:
        """Why a checkpoint is due now, or None. Caller holds the lock."""
        core, settings = self._core, self._core.settings
        if core.snapshot.version <= core.ledger.saved_version and not self._held_changed:
            return None
        if force:
            return "shutdown"
        if self.disk_error is not None:
            return "retry after a failed write"
        if core.queue.training_done:
            return "run finished"
        if core.ledger.unsaved() >= settings.save_model:
            return f"SAVE_MODEL={settings.save_model}"
        if now - self._changed_at >= settings.idle_save_seconds:
            return "idle"
        return None

    def save_if_due(self, *, force: bool = False, wait: bool = True) -> Path | None:
        """Write a checkpoint when one is due; with wait=False leave it to a write running.

        A caller that finds a write running sets `_save_wanted` and returns; the
        writer looks again once it is done, so no due checkpoint is skipped (an
        update applied during a write is saved right after it, not at the next one).
        """
        path = None
        while True:
            self._save_wanted = True
            if not self._save_lock.acquire(blocking=wait):
                return path
            try:
                self._save_wanted = False
                path = self._save_once(force) or path
            finally:
                self._save_lock.release()
            if not self._save_wanted:
                return path

    def settle(self) -> None:
        """Without DURABLE, once a journal left by a run that had it is replayed: stop
        journaling, checkpoint the replayed state now, then remove the journal (kept, with
        updates refused, until a checkpoint write succeeds). Caller holds the lock: at start,
        before any request, so the write is made under it."""
        journal = self.journal
        if journal is None:
            return
        self.journal, self.covered, self._leftover = None, journal.step, journal.path
        journal.close()
        if journal.last > journal.step:  # a round rule's open round: never in a checkpoint
            log.warning(
                "DURABLE=false: the open round's updates replayed from journal %s (%d) are "
                "in memory only from now on, like every update of an open round",
                journal.path,
                journal.last - journal.step,
            )
        why = "journal replayed without DURABLE"
        self._save_once(True, reason=why, lock=contextlib.nullcontext())
        if self.disk_error is None:  # written, or nothing replayed changed the checkpoint
            self._drop_leftover()

    def _drop_leftover(self) -> None:
        path, self._leftover = self._leftover, None
        if path is not None:
            path.unlink(missing_ok=True)
            log.info("journal %s: its records are in a checkpoint; removed", path)

    def _save_once(
        self,
        force: bool,
        *,
        reason: str | None = None,
        lock: AbstractContextManager[object] | None = None,
    ) -> Path | None:
        """One checkpoint if due (said to be for `reason`, when given). Caller holds
        _save_lock, or `lock` stands for the state's lock, which the caller holds."""
        core = self._core
        lock = lock or self._lock
        with lock:
            due = self.reason(self._clock(), force)
            if due is None:
                return None
            reason = reason or due
            view = self._view()
            self._held_changed = False
            self._floor = view.snapshot.version
        snap = view.snapshot
        started = time.perf_counter()
        try:
            path = checkpoints.save(
                core.settings.model_dir,
                snap.version,
                {**snap.tensors, **view.rule_tensors},
                view.metadata,
                keep=core.settings.keep_checkpoints,
            )
        except (OSError, weights.WeightsError) as exc:
            self._failed(snap, getattr(exc, "strerror", None) or str(exc), lock)
            return None
        with lock:
            if self.disk_error is not None:
                log.info("checkpoints can be written again: taking updates")
                core.events.add("checkpoint", "checkpoints can be written again")
            self.disk_error = None
            unsaved = view.updates_total - core.ledger.saved_total
            core.ledger.saved(snap.version, view.updates_total, str(view.metadata["time"]))
            core.events.add("checkpoint", f"checkpoint v{snap.version} ({reason})")
            self.covered = view.covered
        core.metrics.checkpoint_written(seconds=time.perf_counter() - started)
        self._cut_journal(view.covered)
        self._drop_leftover()
        log.info(
            "checkpoint v%d written to %s (%s; %d samples, %d updates since the last)",
            snap.version,
            path,
            reason,
            snap.samples,
            unsaved,
        )
        return path

    def _cut_journal(self, covered: int) -> None:
        """Drop the journal records a checkpoint now holds. Caller holds _save_lock."""
        journal = self.journal
        if journal is None:
            return
        try:
            journal.truncate(covered)
        except OSError as exc:  # the records stay: a replay skips those the checkpoint holds
            log.warning("journal %s could not be cut (%s)", journal.path, exc.strerror or exc)

    def _failed(self, snap: Snapshot, reason: str, lock: AbstractContextManager[object]) -> None:
        """A write failed: keep what it held unsaved and say so (loudly the first time)."""
        core = self._core
        with lock:
            self._held_changed = True  # still unsaved
            first = self.disk_error is None
            self.disk_error = reason
            if first:
                core.events.add("checkpoint", f"checkpoint v{snap.version} failed: {reason}")
        if first:
            log.error(
                "checkpoint v%d could not be written to %s (%s): new updates get 503 "
                "until a write succeeds; retrying",
                snap.version,
                core.settings.model_dir,
                reason,
            )
        core.metrics.checkpoint_failed()

    def _view(self) -> _View:
        """What a checkpoint of the current version holds. Caller holds the lock."""
        core = self._core
        metadata: dict[str, object] = {
            # Updates a buffering rule holds: in its saved buffer, so counted once on resume.
            "held": json.dumps(
                [
                    [u.update_id, u.client_id, u.num_samples, u.base_version, u.task_id]
                    for u in core.held
                ]
            ),
            "samples": core.snapshot.samples,
            "model": core.settings.model,
            "strategy": core.strategy.name,
            "strategy_state": json.dumps(core.strategy.state_dict()),
            # with the attempts of tasks given back or run out (a dropout is drawn per attempt)
            "tasks_state": json.dumps(
                {
                    **core.queue.state_dict(),
                    "attempts": core.queue.attempts_state(),
                    "clock": core.queue.run_clock.state_dict(),  # the run's (simulated) time
                }
            ),
            "stages_state": json.dumps(core.stages.state_dict()),  # e.g. adaptive clipping's norm
            # the round and clients of the history entries still to come (evaluations.py)
            "pending": json.dumps(core.evaluations.pending()),
            "updates": core.ledger.total,
            "applied_ids": json.dumps(core.ledger.recent()),
            "time": iso(self._wall()),
            COVERED: self.journal.step if self.journal is not None else self.covered,
        }
        rule = {
            checkpoints.STRATEGY_PREFIX + name: tensor
            for name, tensor in core.strategy.tensor_state().items()
        }
        # CLOCK=virtual, asynchronous rules: the older versions clients in flight start from,
        # so that a restart hands their tasks out on them again (virtual_async.py).
        for version, base in getattr(getattr(core, "sim", None), "bases", {}).items():
            if version != core.snapshot.version:
                for name, tensor in base.tensors.items():
                    rule[f"{checkpoints.STRATEGY_PREFIX}{BASE_TENSORS}{version}/{name}"] = tensor
        return _View(core.snapshot, metadata, core.ledger.total, rule, int(metadata[COVERED]))
