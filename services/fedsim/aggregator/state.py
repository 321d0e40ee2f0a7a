"""The aggregator's global state, shared by the request threads of its one process.

The core: the lock, the served snapshot and its versions, the rule step and
publishing, the clock. Each other job is a module working on this core under its
lock: whether an update is new, what the rule does with it and when a round
closes (intake.py), tasks given back and a diverged training's stop (dropouts.py),
checkpoints (saving.py), the versions waiting for a
score (evaluations.py), which updates were aggregated (ledger.py), what
/v1/status shows (views.py, events.py).

The served model is a `Snapshot`, swapped by reference under `_lock`; readers
take the current one without locking. An update that answers a task counts once
whatever happens (its task id is deterministic and remembered in checkpoints);
a hand-started client's update (no task) is deduplicated by its update_id.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.aggregator import (
    dropouts,
    intake,
    persistence,
    privacy,
    quota,
    replay,
    restore,
    tasks,
    views,
    virtual,
)
from fedsim.aggregator.evaluations import MAX_WAITING_EVALUATIONS, Evaluations
from fedsim.aggregator.events import Events, iso
from fedsim.aggregator.holding import Holds
from fedsim.aggregator.ledger import Ledger
from fedsim.aggregator.metrics import Recorder
from fedsim.aggregator.persistence import StartupError
from fedsim.aggregator.saving import Saver
from fedsim.aggregator.snapshot import Snapshot
from fedsim.aggregator.strategies import Global, Refused, Update
from fedsim.config import Settings
from fedsim.models import SHAPES
from fedsim.protocol import TrainTask

log = logging.getLogger("fedsim.aggregator")

__all__ = ["Result", "Snapshot", "StartupError", "State"]

Tensors = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Result:
    version: int
    duplicate: bool
    seq: int | None  # the update's sequence number; None while a round holds it


class State:
    """Global model, rule, task queue and the records around them; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        start: persistence.Start,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings, self.manifest = settings, start.manifest
        self.layout = SHAPES[settings.model]
        # The update pipeline: each upload goes through `stages.receive` (uploads.py), each
        # aggregate through `stages.publish` before it is served.
        self.stages = restore.stages(settings, start)  # with their saved state
        self.privacy = privacy.Privacy.of(settings)  # the DP accountant; None when DP is off
        self.strategy, self.queue = restore.restore(settings, start, clock=clock, wall=wall)
        ckpt = start.checkpoint
        self.snapshot = Snapshot.of(
            ckpt.tensors, ckpt.version, start.samples, settings.model, settings.compression_down
        )
        # Updates a buffering rule (fedbuff) took but has not applied yet, and the recent
        # versions it may need as the base an update was trained from.
        self.held: list[Update] = [
            Update(client, update_id, base, samples, {}, {}, task)
            for update_id, client, samples, base, task in start.held
        ]
        self._bases: OrderedDict[int, Snapshot] = OrderedDict()
        self._clock, self._wall = clock, wall
        self._lock = threading.Lock()
        self.metrics: Recorder = Recorder()  # the app sets its Prometheus metrics
        saved_at = iso(ckpt.path.stat().st_mtime)
        self.ledger = Ledger(start.applied_ids, start.updates, ckpt.version, saved_at)
        self.attackers = [f"client-{n}" for n in sorted(self.queue.attackers)]
        self.evaluations = Evaluations(self, start.history, self.attackers)
        self.population = start.population  # clients.json: speed, bandwidth, dropout
        self.clients = views.Clients(start.clients, self.attackers, start.population)
        self.recent: deque[dict[str, Any]] = deque(maxlen=views.HISTORY)
        self.events = Events(wall)
        self.saver = Saver(self, self._lock, clock, wall)
        self.quota = quota.Quota.of(start.clients, settings, self.strategy.mode, clock)
        self.sim = virtual.driver(self, clock)  # CLOCK=virtual: the simulated order; else None
        self.holds = Holds()  # idle workers' asks wait here for the next change
        self._stop = threading.Event()
        self._wake = threading.Event()  # an update made a checkpoint due: write it now
        self._ticker: threading.Thread | None = None
        if self.attackers:
            log.info(
                "attack simulation: %s by %s (the rule is not told)",
                settings.attack,
                ", ".join(self.attackers),
            )
        self.events.add(
            "restart",
            f"started from checkpoint v{ckpt.version} ({self.strategy.name}, "
            f"{settings.partition}, {len(start.clients)} logical clients)",
        )
        made_by = self.evaluations.restore(start.pending)  # the round that made ckpt.version
        if not self.evaluations.scored(ckpt.version):
            self.evaluations.want(self.snapshot, made_by, self.ledger.total)
        with self._lock:  # DURABLE: what the journal holds beyond the checkpoint
            replay.resume(self, start, clock())
        if self.queue.training_done and self.evaluations.entries and not self.queue.evals:
            log.info("the run is finished: nothing left to train or score")

    @classmethod
    def resume(
        cls,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> State:
        """Start from the newest checkpoint that reads back whole. Raises StartupError."""
        start = persistence.load(settings, settings.aggregation)
        state = cls(settings, start, clock=clock, wall=wall)
        log.info(
            "resumed from %s: version %d, %d samples, model %s, strategy %s, partition %s "
            "(%d logical clients)%s",
            start.checkpoint.path,
            state.snapshot.version,
            state.snapshot.samples,
            settings.model,
            state.strategy.name,
            settings.partition,
            len(start.clients),
            " (finished)" if state.queue.finished else "",
        )
        return state

    # --- reads (views.py, evaluations.py) and saves (saving.py) -----------------------

    @property
    def disk_error(self) -> str | None:
        """Why the last checkpoint write failed, until one works (updates get 503 meanwhile)."""
        return self.saver.disk_error

    def status(self, clients: int | None = views.STATUS_CLIENTS) -> dict[str, Any]:
        with self._lock:
            intake.close_round_if_due(self, self._clock())
            return views.status(self, clients)

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return views.summary(self)

    def lookup(self, update_id: str, seq: int | None = None) -> dict[str, Any]:
        with self._lock:
            return views.lookup(self, update_id, seq)

    def history(self, after: int = -1, limit: int | None = None) -> list[dict[str, Any]]:
        """Copies of the entries of versions after `after`, in order (a page: evaluations.py)."""
        with self._lock:
            return self.evaluations.page(after, limit)

    def info(self) -> tuple[int, bool]:
        """(version, finished), for error bodies."""
        return self.snapshot.version, self.queue.finished

    def snapshot_of(self, version: int) -> Snapshot | None:
        """The current snapshot, or a past one kept for its evaluation or a task's base."""
        snap = self.snapshot
        kept = self.evaluations.snapshot_of(version) or virtual.base(self.sim, version)
        return snap if snap.version == version else kept

    def save_if_due(self, *, force: bool = False, wait: bool = True) -> Path | None:
        return self.saver.save_if_due(force=force, wait=wait)

    def after_update(self) -> None:
        """An update was acknowledged: the checkpoint it may have made due is written by
        the ticker thread, woken now, so no request waits for a write (with no ticker, as
        under the tests, by the request itself unless a write is running)."""
        if self._ticker is not None:
            self._wake.set()
        else:
            self.saver.save_if_due(wait=False)

    def record_evaluation(
        self, task_id: str, lease: str, accuracy: float, loss: float, worker: str
    ) -> dict[str, Any]:
        """Append an evaluation to the history. Raises Refused when it is not wanted."""
        with self._lock:
            return self.evaluations.record(task_id, lease, accuracy, loss, worker)

    def note_refusal(self, who: str, code: str, detail: str) -> None:
        with self._lock:
            self.events.add("refused", f"{who}: {code}: {detail}")
        self.metrics.update_refused(code)

    # --- tasks ------------------------------------------------------------------------

    def hello(self, uid: str) -> dict[str, Any]:
        with self._lock:
            now = self._clock()
            worker = self.queue.worker(uid, now)
            return {"worker": worker.name, "workers": self.queue.live_workers(now)}

    def live_workers(self) -> int:
        with self._lock:
            return self.queue.live_workers(self._clock())

    def ask(self, uid: str, retries: int = 0) -> tuple[tasks.Offer, str]:
        """A task for worker `uid`, or why there is none; also the worker's short name."""
        with self._lock:
            intake.close_round_if_due(self, self._clock())
            virtual.catch_up(self, self.sim)  # CLOCK=virtual: a round opens at its time
            offer, worker = self.queue.ask(uid, self.snapshot.version, retries)
            self.drain_expired()
            if offer.task is not None:
                task = offer.task
                if isinstance(task, TrainTask):
                    log.info(
                        "task %s (%s) to %s, base v%d",
                        task.id,
                        task.client,
                        worker.name,
                        task.base_version,
                    )
                self.metrics.task_handed_out(task.kind)
            return offer, worker.name

    def give_back(self, task_id: str, lease: str) -> int:
        """A worker gives back a task its client dropped (dropouts.py). Refused if not held."""
        with self._lock:
            return dropouts.give_back(self, task_id, lease)

    def diverged(self, task_id: str, lease: str, detail: str) -> str:
        """A worker's training diverged: the run stops (dropouts.py). Refused if not held."""
        with self._lock:
            reason = dropouts.stop(self, task_id, lease, detail)
        self.holds.changed()  # idle workers hear that the run is over
        return reason

    def drain_expired(self) -> None:
        """Log and count the leases that ran out since the last call. Caller holds _lock."""
        for task_id, worker in self.queue.drain_expired():
            log.warning(
                "task %s of %s ran out after TASK_TIMEOUT=%gs: it goes to the next worker",
                task_id,
                worker,
                self.settings.task_timeout,
            )
            self.events.add("task", f"task {task_id} of {worker} expired")
            self.metrics.task_expired("evaluate" if task_id.startswith("eval.") else "train")

    def secure(self, step: Callable[[State, float], Any]) -> Any:
        """A secure aggregation step (aggregator/secure.py) under the lock, at the clock's now."""
        with self._lock:
            return step(self, self._clock())

    # --- updates ----------------------------------------------------------------------

    def submit(self, update: Update) -> Result:
        """Aggregate a validated update once. Raises Refused (nothing changes then)."""
        result = self._submit(update)
        self.saver.sync()  # DURABLE: acknowledged once it is in the fsynced journal
        return result

    def _submit(self, update: Update) -> Result:
        with self._lock:
            if self.saver.disk_error is not None:
                # Acknowledging an update that cannot be saved could lose it: refuse it
                # until a checkpoint is written again (the ticker keeps trying).
                raise Refused(
                    "unavailable",
                    f"checkpoints cannot be written ({self.saver.disk_error}); try again later",
                    status=503,
                )
            now = self._clock()
            intake.close_round_if_due(self, now)
            version = self.snapshot.version
            if intake.seen(self, update, version):
                self.metrics.update_duplicate()
                log.info(
                    "duplicate update %s from client %s acknowledged, not aggregated again",
                    update.update_id,
                    update.client_id,
                )
                return Result(version, True, self.ledger.number(update.update_id))
            with self.quota.charge(update, version):  # 429 beyond one client's share
                if self.sim is not None:  # CLOCK=virtual: in simulated-arrival order
                    virtual.arrive(self, self.sim, update)
                elif self.strategy.mode == "async":
                    intake.accept(self, update, version, now)
                else:
                    intake.add_to_round(self, update, version, now)
            return Result(self.snapshot.version, False, self.ledger.number(update.update_id))

    # --- the rule step and publishing (intake.py calls them) -------------------------

    def current(self) -> Global:
        """The current version as a rule sees it."""
        snap = self.snapshot
        return Global(snap.tensors, snap.version, snap.samples)

    def base(self, version: int) -> Snapshot | None:
        """A version still in memory: current, recent (an update's base), or waiting for a score."""
        return self._bases.get(version) or self.snapshot_of(version)

    def rule_step(
        self, step: Callable[[], Tensors | None], updates: list[Update]
    ) -> Tensors | None:
        """Run one step of the rule (`step`: accept, flush or aggregate) and check its result.

        The stages before publishing: rule step -> check. On Refused the rule's
        state is put back as it was, so nothing changed. Caller holds _lock.
        """
        saved = json.dumps(self.strategy.state_dict()), dict(self.strategy.tensor_state())
        try:
            tensors = intake.check_step(self, step(), updates)
        except Refused:
            self.strategy.load_state_dict(json.loads(saved[0]))
            self.strategy.load_tensor_state(saved[1])
            raise
        return tensors

    def apply(self, tensors: Tensors, updates: list[Update], now: float) -> None:
        """Publish checked `tensors` as the next version, made of `updates`. Caller holds _lock."""
        old = self.snapshot
        added = sum(u.num_samples for u in updates)
        model, down = self.settings.model, self.settings.compression_down
        self.snapshot = new = Snapshot.of(
            tensors, old.version + 1, old.samples + added, model, down
        )
        # Kept for asynchronous rules and for a codec (pipeline/compress.py): an update's base.
        if getattr(self.strategy, "wants_base", False) or self.stages.wants_base:
            self._bases[old.version] = old
            while len(self._bases) > MAX_WAITING_EVALUATIONS:
                self._bases.popitem(last=False)
        self.saver.changed(now)
        stamp = self.stamp()
        for u in updates:
            self.ledger.add(u.update_id, new.version)
            self.evaluations.saw(u.client_id)
            if self.strategy.mode == "async":
                self.clients.see(u, old.version - u.base_version, stamp)
            self.recent.append(views.applied(u, new.version, stamp))
            self.metrics.update_accepted(staleness=max(0, old.version - u.base_version))
        self.metrics.set_version(new.version)

    # --- time -----------------------------------------------------------------------

    def stamp(self) -> str:
        """The wall-clock time, as records show it."""
        return iso(self._wall())

    def poll(self) -> Snapshot:
        """The current snapshot, closing a timed-out round first (lock taken only then)."""
        queue = self.queue
        if isinstance(queue, tasks.RoundQueue):
            deadline = queue.deadline()
            if deadline is not None and queue.run_clock() >= deadline:
                self.tick()
        return self.snapshot

    def tick(self) -> None:
        """Close what is due, then checkpoint if due. Called by the ticker and lazily."""
        with self._lock:
            intake.close_round_if_due(self, self._clock())
        self.holds.changed()  # a deadline or an expired lease may have made work
        self.saver.save_if_due(wait=False)

    def start_ticker(self, interval: float) -> None:
        """The thread that closes rounds at their deadline and writes every checkpoint while
        the app runs: every `interval` s, and at once when an update wakes it. A write takes
        the newest version, so updates acknowledged during one are in the next: under a
        stream of updates faster than the disk, checkpoints come back to back, each holding
        SAVE_MODEL updates or more."""

        def run() -> None:
            while True:
                self._wake.wait(interval)
                self._wake.clear()
                if self._stop.is_set():
                    return
                try:
                    self.tick()
                except Exception:  # keep ticking; the next save retries
                    log.exception("background tick failed")

        self._ticker = threading.Thread(target=run, name="fedsim-ticker", daemon=True)
        self._ticker.start()

    def close(self) -> None:
        """Stop the ticker and checkpoint whatever is unsaved (graceful shutdown)."""
        self._stop.set()
        self._wake.set()
        if self._ticker is not None:
            self._ticker.join()
        self.saver.save_if_due(force=True)
