"""The aggregator's global state, shared by the request threads of its one process.

The served model is a `Snapshot`: weights plus their safetensors bytes, encoded
once per version and never changed. A new version swaps the reference under
`_lock`; readers take the current reference without locking, so downloads never
wait on uploads and never see a half-written model. Checkpoints are written
outside `_lock` (under `_save_lock`, which only serializes disk writes), from a
consistent view captured under it.

Work is handed out by the task queue (tasks.py); an update that answers a task
counts once whatever happens (its task id is deterministic and remembered in
checkpoints). A hand-started client's update (no task) is deduplicated by its
update_id, as before tasks existed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fedsim import checkpoints, weights
from fedsim.aggregator import history, persistence, strategies, tasks, uploads
from fedsim.aggregator.persistence import StartupError
from fedsim.aggregator.strategies import Global, Refused, Update
from fedsim.config import Settings
from fedsim.models import SHAPES

log = logging.getLogger("fedsim.aggregator")

__all__ = ["Result", "Snapshot", "StartupError", "State"]

REMEMBERED_IDS = 100_000  # applied update ids kept in memory for dedup (~15 MB at most)
SAVED_IDS = 256  # the most recent of them saved in a checkpoint, for dedup after a restart
SAVED_IDS_BYTES = 24_000  # and at most this much JSON: a checkpoint header must stay < 64 kB
HISTORY = 20  # recent aggregated updates shown by /v1/status
EVENTS = 50  # recent events shown by /v1/status and the dashboard
MAX_CLIENTS_SHOWN = 1000  # hand-started clients remembered for /v1/status
MAX_WEIGHT = uploads.MAX_WEIGHT  # a global weight beyond this is never published
MAX_WAITING_EVALUATIONS = 8  # versions kept in memory until a worker scores them


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@dataclass(frozen=True)
class Snapshot:
    """One immutable version of the global model, with its bytes as served."""

    version: int
    samples: int
    tensors: Mapping[str, np.ndarray]
    body: bytes
    etag: str  # the version and a digest of the bytes: a restart that re-makes N differs

    @classmethod
    def of(cls, tensors: Mapping[str, np.ndarray], version: int, samples: int, model: str):
        frozen = {}
        for name, tensor in tensors.items():
            tensor = np.ascontiguousarray(tensor, dtype=np.float32)
            tensor.flags.writeable = False  # shared by readers: nobody may change it in place
            frozen[name] = tensor
        body = weights.encode(frozen, {"version": version, "samples": samples, "model": model})
        etag = f"{version}-{hashlib.sha256(body).hexdigest()[:16]}"
        return cls(version, samples, frozen, body, etag)


@dataclass(frozen=True)
class Result:
    version: int
    duplicate: bool
    seq: int | None  # the update's sequence number; None while a round holds it


@dataclass(frozen=True)
class _SaveView:
    snapshot: Snapshot
    metadata: dict[str, object]
    updates_total: int
    rule_tensors: dict[str, np.ndarray]  # the rule's server state, beside the model's


def _queue(
    settings: Settings, clients: list[tasks.Client], strategy: strategies.Strategy, **kw: Any
) -> tasks.Queue:
    mode = strategy.mode
    common = {
        "seed": settings.seed,
        "per_round": settings.per_round,
        "rounds": settings.rounds,
        "task_timeout": settings.task_timeout,
        "training": {
            "model": settings.model,
            "epochs": settings.epochs,
            "batch_size": settings.batch_size,
            "learning_rate": settings.learning_rate,
            "optimizer": settings.optimizer,
            **strategy.client_settings(),  # e.g. FedProx's proximal_mu
        },
        **kw,
    }
    if settings.attack != "none":
        common["attack"] = {"kind": settings.attack, "scale": settings.attack_scale}
        common["attackers"] = tasks.choose_attackers(
            settings.seed, settings.attackers, len(clients)
        )
    if mode == "rounds":
        return tasks.RoundQueue(
            clients, quorum=settings.round_quorum, round_timeout=settings.round_timeout, **common
        )
    if settings.partition == "slices":
        return tasks.SliceQueue(clients, **common)
    return tasks.SampledQueue(clients, **common)


class State:
    """Global model, rule, task queue, dedup ids, clients, workers, history and checkpoints."""

    def __init__(
        self,
        settings: Settings,
        start: persistence.Start,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.layout = SHAPES[settings.model]
        self.strategy = strategies.build(settings)
        try:
            if start.strategy_state:
                self.strategy.load_state_dict(start.strategy_state)
            self.strategy.load_tensor_state(start.strategy_tensors)
        except (ValueError, TypeError, KeyError) as exc:
            raise StartupError(f"checkpoint has a bad strategy state: {exc}") from None
        # Updates a buffering rule (fedbuff) took but has not applied yet, and the recent
        # versions it may need as the base an update was trained from.
        self._held: list[Update] = [
            Update(client, update_id, base, samples, {}, {}, task)
            for update_id, client, samples, base, task in start.held
        ]
        self._held_changed = False
        self._bases: OrderedDict[int, Snapshot] = OrderedDict()
        ckpt = start.checkpoint
        self.snapshot = Snapshot.of(ckpt.tensors, ckpt.version, start.samples, settings.model)
        self._clock, self._wall = clock, wall
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._save_wanted = False
        self.disk_error: str | None = None  # why the last checkpoint write failed, until one works
        self.manifest = start.manifest
        self.queue = _queue(
            settings,
            start.clients,
            self.strategy,
            partition=self.manifest["settings"],
            clock=clock,
            wall=wall,
        )
        try:
            self.queue.load_state_dict(start.tasks_state)
        except (ValueError, TypeError, KeyError) as exc:
            raise StartupError(f"checkpoint has a bad task state: {exc}") from None
        # Applied update id -> (version that included it, its sequence number). The
        # ids restored from a checkpoint are its most recent ones, in order, so the
        # last of them is number `updates`; their version is the checkpoint's.
        first_seq = start.updates - len(start.applied_ids) + 1
        self._applied: OrderedDict[str, tuple[int, int]] = OrderedDict(
            (update_id, (ckpt.version, first_seq + i))
            for i, update_id in enumerate(start.applied_ids)
        )
        self._updates_total = start.updates
        # Versions waiting for their evaluation, and what their history entry will say.
        self._kept: dict[int, Snapshot] = {}
        self._round_of: dict[int, int] = {}
        self._updates_at: dict[int, int] = {}
        self._clients_at: dict[int, list[str]] = {}
        self._history = list(start.history)
        self._recent: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self._events: deque[dict[str, Any]] = deque(maxlen=EVENTS)
        self._since_eval: list[str] = []  # clients in the versions since the last evaluated one
        self._clients = {c.id: self._client_record(c, i) for i, c in enumerate(start.clients)}
        self.attackers = [f"client-{n}" for n in sorted(self.queue.attackers)]
        for client_id in self.attackers:
            self._clients[client_id]["attacker"] = True
        if self.attackers:
            log.info(
                "attack simulation: %s by %s (the rule is not told)",
                settings.attack,
                ", ".join(self.attackers),
            )
        self._others: OrderedDict[str, dict[str, Any]] = OrderedDict()  # hand-started clients
        self._saved_version = ckpt.version
        self._saved_updates = start.updates
        self._last_checkpoint = {"version": ckpt.version, "time": _iso(ckpt.path.stat().st_mtime)}
        self._changed_at = clock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self.metrics_hook: Callable[[str, dict[str, Any]], None] | None = None
        self._event(
            "restart",
            f"started from checkpoint v{ckpt.version} ({self.strategy.name}, "
            f"{settings.partition}, {len(start.clients)} logical clients)",
        )
        if not any(e["version"] == ckpt.version for e in self._history):
            self._want_evaluation(self.snapshot)
        if self.queue.training_done and self._history and not self.queue.evals:
            log.info("the run is finished: nothing left to train or score")

    def _client_record(self, client: tasks.Client, index: int) -> dict[str, Any]:
        labels = self.manifest["clients"][index].get("labels")
        return {
            "id": client.id,
            "samples": client.samples,
            "labels": labels,
            "slices": f"{client.slices[0]}-{client.slices[1]}" if client.slices else None,
            "updates": 0,
            "last_seen": None,
            "staleness": None,
            "loss": None,
            "accuracy": None,
            "attacker": False,
        }

    # --- start --------------------------------------------------------------------

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

    # --- events and metrics -------------------------------------------------------

    def _event(self, kind: str, text: str) -> None:
        self._events.append({"time": _iso(self._wall()), "kind": kind, "text": text})

    def measure(self, what: str, **values: Any) -> None:
        """Count something in the metrics (bytes sent and received, from the routes)."""
        self._measure(what, **values)

    def live_workers(self) -> int:
        with self._lock:
            return self.queue.live_workers(self._clock())

    def _drain_expired(self) -> None:
        """Log and count the leases that ran out since the last call. Caller holds _lock."""
        for task_id, worker in self.queue.drain_expired():
            log.warning(
                "task %s of %s ran out after TASK_TIMEOUT=%gs: it goes to the next worker",
                task_id,
                worker,
                self.settings.task_timeout,
            )
            self._event("task", f"task {task_id} of {worker} expired")
            self._measure(
                "task_expired", kind="evaluate" if task_id.startswith("eval.") else "train"
            )

    def _measure(self, what: str, **values: Any) -> None:
        if self.metrics_hook is not None:
            try:
                self.metrics_hook(what, values)
            except Exception:  # metrics never break the service
                log.exception("metrics hook failed for %s", what)

    def note_refusal(self, who: str, code: str, detail: str) -> None:
        with self._lock:
            self._event("refused", f"{who}: {code}: {detail}")
        self._measure("refused", reason=code)

    # --- tasks --------------------------------------------------------------------

    def hello(self, uid: str) -> dict[str, Any]:
        with self._lock:
            now = self._clock()
            worker = self.queue.worker(uid, now)
            return {"worker": worker.name, "workers": self.queue.live_workers(now)}

    def ask(self, uid: str, retries: int = 0) -> tuple[tasks.Offer, str]:
        """A task for worker `uid`, or why there is none; also the worker's short name."""
        with self._lock:
            self._tick_locked(self._clock())
            offer, worker = self.queue.ask(uid, self.snapshot.version, retries)
            self._drain_expired()
            if offer.task is not None:
                task = offer.task
                if task["kind"] == "train":
                    log.info(
                        "task %s (%s) to %s, base v%d",
                        task["id"],
                        task["client"],
                        worker.name,
                        task["base_version"],
                    )
                self._measure("task", kind=task["kind"])
            return offer, worker.name

    def snapshot_of(self, version: int) -> Snapshot | None:
        """The current snapshot, or a past one kept for its evaluation."""
        snap = self.snapshot
        return snap if snap.version == version else self._kept.get(version)

    def record_evaluation(
        self, task_id: str, lease: str, accuracy: float, loss: float, worker: str
    ) -> dict[str, Any]:
        """Append an evaluation to the history. Raises Refused when it is not wanted."""
        with self._lock:
            version = self.queue.check_evaluation(task_id, lease)
            record = self.queue.workers.get(worker)
            worker = record.name if record is not None else worker
            entry = {
                "version": version,
                "round": self._round_of.get(version),
                "time": _iso(self._wall()),
                "accuracy": round(float(accuracy), 6),
                "loss": round(float(loss), 6),
                "samples": self._kept[version].samples if version in self._kept else None,
                "updates": self._updates_at.get(version),
                "clients": self._clients_at.pop(version, []),
            }
            if self.attackers:
                entry["attackers"] = [c for c in entry["clients"] if c in self.attackers]
            try:
                history.append(self.settings.model_dir, entry)
            except OSError as exc:
                raise Refused(
                    "unavailable",
                    f"the history cannot be written ({exc.strerror or exc}); try again later",
                    status=503,
                ) from None
            self._history = [e for e in self._history if e["version"] != version] + [entry]
            self._history.sort(key=lambda e: e["version"])
            self.queue.record_evaluation(task_id, lease, version)
            self._measure("task_finished", kind="evaluate")
            self._kept.pop(version, None)
            where = f"round {entry['round']} (v{version})" if entry["round"] else f"v{version}"
            log.info(
                "evaluation of %s by %s: test accuracy %.4f, loss %.4f",
                where,
                worker,
                accuracy,
                loss,
            )
            self._event("evaluation", f"{where}: test accuracy {accuracy:.4f}, loss {loss:.4f}")
            self._round_of.pop(version, None)
            self._updates_at.pop(version, None)
            if self.queue.finished:
                log.info("the run is finished at version %d", self.snapshot.version)
                self._event("finished", f"run finished at version {self.snapshot.version}")
                self._measure("finished", finished=True)
            self._measure("evaluation", accuracy=accuracy, loss=loss, version=version)
            return entry

    def _want_evaluation(self, snap: Snapshot, round_no: int | None = None) -> None:
        """Queue a score of `snap` (caller holds _lock, or is the constructor)."""
        self._kept[snap.version] = snap
        if round_no is not None:
            self._round_of[snap.version] = round_no
        self._updates_at[snap.version] = self._updates_total
        self._clients_at[snap.version] = sorted(set(self._since_eval))
        self._since_eval = []
        self.queue.want_evaluation(snap.version)
        # Each waiting version holds a model in memory: when no worker scores them (none
        # left, or updates far faster than evaluations), the oldest waiting one is dropped.
        for version in self.queue.drop_evaluations(keep=MAX_WAITING_EVALUATIONS):
            self._kept.pop(version, None)
            self._round_of.pop(version, None)
            self._updates_at.pop(version, None)
            self._clients_at.pop(version, None)
            log.warning(
                "evaluation of v%d skipped: %d newer versions wait for theirs",
                version,
                MAX_WAITING_EVALUATIONS,
            )

    # --- updates ------------------------------------------------------------------

    def submit(self, update: Update) -> Result:
        """Aggregate a validated update once. Raises Refused (nothing changes then)."""
        with self._lock:
            if self.disk_error is not None:
                # Acknowledging an update that cannot be saved could lose it: refuse it
                # until a checkpoint is written again (the ticker keeps trying).
                raise Refused(
                    "unavailable",
                    f"checkpoints cannot be written ({self.disk_error}); try again later",
                    status=503,
                )
            now = self._clock()
            self._tick_locked(now)
            version = self.snapshot.version
            known = self._applied.get(update.update_id)
            if update.task_id is not None and known is not None:
                self._measure("duplicate")
                log.info(
                    "duplicate update for task %s from %s acknowledged, not aggregated again",
                    update.task_id,
                    update.client_id,
                )
                return Result(version, True, known[1])
            if update.task_id is not None:
                fresh = self.queue.check_update(
                    update.task_id,
                    update.lease,
                    update.client_id,
                    update.base_version,
                    version,
                    update.num_samples,
                )
                known = self._applied.get(update.update_id)
                self._drain_expired()
                if not fresh:
                    self._measure("duplicate")
                    log.info(
                        "duplicate update for task %s from %s acknowledged, not aggregated again",
                        update.task_id,
                        update.client_id,
                    )
                    return Result(version, True, known[1] if known else None)
            else:
                if update.num_samples > self.settings.num_images_train:
                    raise Refused(
                        "bad_num_samples",
                        f"num_samples={update.num_samples}: an update without a task is one "
                        f"slice, at most NUM_IMAGES_TRAIN={self.settings.num_images_train}",
                        status=422,
                    )
                if self.strategy.mode != "async":
                    raise Refused(
                        "no_task",
                        f"{self.strategy.name} runs rounds of sampled clients: only updates for "
                        "tasks count; start a worker instead of a client with its own range",
                    )
                known = self._applied.get(update.update_id)
                if known is not None or any(u.update_id == update.update_id for u in self._held):
                    self._measure("duplicate")
                    log.info(
                        "duplicate update %s from client %s acknowledged, not aggregated again",
                        update.update_id,
                        update.client_id,
                    )
                    return Result(version, True, known[1] if known else None)
            if self.strategy.mode == "async":
                saved = self._rule_state()
                base = self._base_of(update.base_version) if self.strategy.wants_base else None
                tensors = self.strategy.accept(update, self._global(), base)
                try:
                    if tensors is not None:
                        self._check_aggregate(tensors, [*self._held, update])
                    self._check_rule_state([*self._held, update])
                except Refused:
                    self._restore_rule(saved)
                    if update.task_id is not None:
                        # The task is spent: handing it out again would make the same update.
                        self.queue.record_update(update.task_id, update.lease)
                    raise
                if update.task_id is not None:
                    self.queue.record_update(update.task_id, update.lease)
                    self._measure("task_finished", kind="train")
                if tensors is None:
                    self._hold(update, version)
                else:
                    held, self._held = self._held, []
                    self._apply(tensors, [*held, update], now)
                    self._log_accepted(update)
                    self._after_version(None)
                self._flush_if_done(now)
            else:
                assert isinstance(self.queue, tasks.RoundQueue) and update.task_id is not None
                self.queue.add_update(update.task_id, update, now)
                self.queue.record_update(update.task_id, update.lease)
                self._measure("task_finished", kind="train")
                r = self.queue.round
                assert r is not None
                log.info(
                    "accepted update from %s (task %s): base v%d -> round %d (%d/%d), "
                    "%d samples, loss %s, accuracy %s",
                    update.client_id,
                    update.task_id,
                    update.base_version,
                    r.number,
                    len(r.updates),
                    len(r.sampled),
                    update.num_samples,
                    _metric(update.meta.get("loss")),
                    _metric(update.meta.get("accuracy")),
                )
                self._see_client(update, staleness=version - update.base_version)
                self._close_round_if_due(now)
            known = self._applied.get(update.update_id)
            return Result(self.snapshot.version, False, known[1] if known else None)

    def _rule_state(self) -> tuple[str, dict[str, np.ndarray]]:
        """The rule's state as it is now, to restore when an aggregate is refused."""
        return json.dumps(self.strategy.state_dict()), dict(self.strategy.tensor_state())

    def _restore_rule(self, saved: tuple[str, dict[str, np.ndarray]]) -> None:
        self.strategy.load_state_dict(json.loads(saved[0]))
        self.strategy.load_tensor_state(saved[1])

    def _base_of(self, version: int) -> Global | None:
        """The version an update was trained from: in memory, else its checkpoint file
        (after a restart), else None (the rule then measures from the current model)."""
        snap = self._bases.get(version) or self.snapshot_of(version)
        if snap is not None:
            return Global(snap.tensors, snap.version, snap.samples)
        path = checkpoints.path_for(self.settings.model_dir, version)
        try:
            ckpt = checkpoints.read(path)
        except (OSError, weights.WeightsError):
            return None
        model = checkpoints.split(ckpt.tensors)[0]
        return Global(model, ckpt.version, int(ckpt.metadata.get("samples", "0")))

    def _hold(self, update: Update, version: int) -> None:
        """A buffering rule took `update` without making a version yet. Caller holds _lock."""
        # Only what accounting needs is kept: the rule has folded the tensors in already.
        self._held.append(dataclasses.replace(update, tensors={}))
        self._held_changed = True
        self._changed_at = self._clock()
        self._see_client(update, staleness=version - update.base_version)
        log.info(
            "accepted update from client %s (task %s): base v%d -> buffer (%d waiting), "
            "%d samples, loss %s, accuracy %s",
            update.client_id,
            update.task_id or update.update_id,
            update.base_version,
            self.strategy.pending,
            update.num_samples,
            _metric(update.meta.get("loss")),
            _metric(update.meta.get("accuracy")),
        )

    def _flush_if_done(self, now: float) -> None:
        """At the end of the run, apply what a buffering rule still holds."""
        if not (self.queue.training_done and self._held and self.strategy.pending):
            return
        saved = self._rule_state()
        tensors = self.strategy.flush(self._global())
        if tensors is None:
            return
        try:
            self._check_aggregate(tensors, self._held)
        except Refused:
            self._restore_rule(saved)
            log.error("the last %d buffered updates were refused: no new version", len(self._held))
            self._held = []
            return
        held, self._held = self._held, []
        self._apply(tensors, held, now)
        log.info("the last %d buffered updates -> v%d", len(held), self.snapshot.version)
        self._after_version(None)

    def _log_accepted(self, update: Update) -> None:
        where = f" slice {update.meta['slice']}" if "slice" in update.meta else ""
        task = f" (task {update.task_id})" if update.task_id else ""
        log.info(
            "accepted update from client %s%s%s: base v%d -> v%d, %d samples, "
            "loss %s, accuracy %s, total %d samples",
            update.client_id,
            where,
            task,
            update.base_version,
            self.snapshot.version,
            update.num_samples,
            _metric(update.meta.get("loss")),
            _metric(update.meta.get("accuracy")),
            self.snapshot.samples,
        )

    def _global(self) -> Global:
        snap = self.snapshot
        return Global(snap.tensors, snap.version, snap.samples)

    def _check_aggregate(self, tensors: Mapping[str, np.ndarray], updates: list[Update]) -> None:
        """Refuse new global weights that are not finite or explode (nothing is published)."""
        for name, tensor in tensors.items():
            if not np.isfinite(tensor).all() or np.abs(tensor).max(initial=0) > MAX_WEIGHT:
                who = ", ".join(f"{u.client_id} ({u.update_id})" for u in updates)
                log.error(
                    "refused aggregate: tensor %s would be non-finite or beyond %g; updates: %s",
                    name,
                    MAX_WEIGHT,
                    who,
                )
                raise Refused(
                    "bad_aggregate",
                    f"aggregating this update would make tensor {name} non-finite or larger "
                    f"than {MAX_WEIGHT:g}; the model stays at version {self.snapshot.version}",
                )

    def _check_rule_state(self, updates: list[Update]) -> None:
        """Refuse updates that would leave the rule's own state (momentum, moments, a buffer)
        non-finite: it would be saved, and every later version made from it."""
        for name, tensor in self.strategy.tensor_state().items():
            if not np.isfinite(tensor).all():
                who = ", ".join(f"{u.client_id} ({u.update_id})" for u in updates)
                log.error("refused: the rule's %s would be non-finite; updates: %s", name, who)
                raise Refused(
                    "bad_aggregate",
                    f"this update would make the rule's {name} non-finite; nothing changed",
                )

    def _apply(self, tensors: Mapping[str, np.ndarray], updates: list[Update], now: float) -> None:
        """Make `tensors` the next version. Caller holds _lock."""
        old = self.snapshot
        added = sum(u.num_samples for u in updates)
        self.snapshot = Snapshot.of(
            tensors, old.version + 1, old.samples + added, self.settings.model
        )
        if getattr(self.strategy, "wants_base", False):  # only asynchronous rules have it
            self._bases[old.version] = old
            while len(self._bases) > MAX_WAITING_EVALUATIONS:
                self._bases.popitem(last=False)
        self._changed_at = now
        stamp = _iso(self._wall())
        for u in updates:
            self._updates_total += 1
            self._applied[u.update_id] = (self.snapshot.version, self._updates_total)
            self._since_eval.append(u.client_id)
            if self.strategy.mode == "async":
                self._see_client(u, staleness=old.version - u.base_version)
            self._recent.append(
                {
                    "client_id": u.client_id,
                    "update_id": u.update_id,
                    "task": u.task_id,
                    "slice": u.meta.get("slice"),
                    "base_version": u.base_version,
                    "version": self.snapshot.version,
                    "samples": u.num_samples,
                    "time": stamp,
                }
            )
            self._measure("accepted", staleness=max(0, old.version - u.base_version))
        while len(self._applied) > REMEMBERED_IDS:
            self._applied.popitem(last=False)
        self._measure("version", version=self.snapshot.version)

    def _after_version(self, round_no: int | None) -> None:
        """Queue the evaluations a new version calls for. Caller holds _lock."""
        snap = self.snapshot
        if round_no is not None or snap.version % self.settings.evaluate_every == 0:
            self._want_evaluation(snap, round_no)
        elif self.queue.training_done:
            self._want_evaluation(snap, round_no)  # the final model is always scored
        if self.queue.training_done:
            log.info(
                "all training tasks are done at version %d; scoring the final model", snap.version
            )

    def _close_round_if_due(self, now: float) -> None:
        queue = self.queue
        if not isinstance(queue, tasks.RoundQueue):
            return
        why = queue.due(now)
        if why is None:
            return
        r = queue.close()
        updates = [r.updates[n] for n in r.sampled if n in r.updates]
        started = time.perf_counter()
        saved = self._rule_state()
        try:
            tensors = self.strategy.aggregate(self._global(), updates)
            self._check_aggregate(tensors, updates)
            self._check_rule_state(updates)
        except Refused as exc:
            self._restore_rule(saved)  # no version, so the server optimizer does not move
            log.error("round %d produced no new version: %s", r.number, exc.reason)
            self._event("round", f"round {r.number} refused: {exc.reason}")
            return
        self._apply(tensors, updates, now)
        self._measure("aggregation", seconds=time.perf_counter() - started)
        added = sum(u.num_samples for u in updates)
        log.info(
            "round %d closed (%s): %d of %d sampled clients, %d samples -> v%d, total %d samples%s",
            r.number,
            why,
            len(updates),
            len(r.sampled),
            added,
            self.snapshot.version,
            self.snapshot.samples,
            "; all rounds done" if queue.training_done else "",
        )
        self._event(
            "round",
            f"round {r.number} closed ({why}): {len(updates)}/{len(r.sampled)} clients -> "
            f"v{self.snapshot.version}",
        )
        self._measure("round", number=min(queue.rounds_done + 1, queue.rounds))
        self._want_evaluation(self.snapshot, r.number)

    def _see_client(self, update: Update, staleness: int) -> None:
        record = self._clients.get(update.client_id)
        if record is None:  # a hand-started client, outside the plan
            record = self._others.pop(update.client_id, None) or {
                "id": update.client_id,
                "samples": None,
                "labels": None,
                "slices": None,
                "updates": 0,
            }
            self._others[update.client_id] = record
            while len(self._others) > MAX_CLIENTS_SHOWN:
                self._others.popitem(last=False)
        record["updates"] += 1
        record["last_seen"] = _iso(self._wall())
        record["base_version"] = update.base_version
        record["staleness"] = max(0, staleness)
        for key in ("slices", "slice", "loss", "accuracy", "retries"):
            if key in update.meta:
                record[key] = update.meta[key]

    # --- time ---------------------------------------------------------------------

    def _tick_locked(self, now: float) -> None:
        self._close_round_if_due(now)

    def poll(self) -> Snapshot:
        """The current snapshot, closing a timed-out round first (lock taken only then)."""
        queue = self.queue
        if isinstance(queue, tasks.RoundQueue):
            deadline = queue.deadline()
            if deadline is not None and self._clock() >= deadline:
                self.tick()
        return self.snapshot

    def tick(self) -> None:
        """Close what is due, then checkpoint if due. Called by the ticker and lazily."""
        with self._lock:
            self._tick_locked(self._clock())
        self.save_if_due(wait=False)

    def start_ticker(self, interval: float) -> None:
        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.tick()
                except Exception:  # keep ticking; the next save retries
                    log.exception("background tick failed")

        self._ticker = threading.Thread(target=run, name="fedsim-ticker", daemon=True)
        self._ticker.start()

    def close(self) -> None:
        """Stop the ticker and checkpoint whatever is unsaved (graceful shutdown)."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        self.save_if_due(force=True)

    # --- checkpoints --------------------------------------------------------------

    def _save_reason(self, now: float, force: bool) -> str | None:
        if self.snapshot.version <= self._saved_version and not self._held_changed:
            return None
        if force:
            return "shutdown"
        if self.disk_error is not None:
            return "retry after a failed write"
        if self.queue.training_done:
            return "run finished"
        # SAVE_MODEL counts aggregated updates, not versions: a round is one version
        # made of several updates.
        if self._updates_total - self._saved_updates >= self.settings.save_model:
            return f"SAVE_MODEL={self.settings.save_model}"
        if now - self._changed_at >= self.settings.idle_save_seconds:
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

    def _save_once(self, force: bool) -> Path | None:
        """One checkpoint if due. Caller holds _save_lock."""
        with self._lock:
            reason = self._save_reason(self._clock(), force)
            if reason is None:
                return None
            view = self._save_view()
            self._held_changed = False
        snap = view.snapshot
        started = time.perf_counter()
        try:
            path = checkpoints.save(
                self.settings.model_dir,
                snap.version,
                {**snap.tensors, **view.rule_tensors},
                view.metadata,
                keep=self.settings.keep_checkpoints,
            )
        except (OSError, weights.WeightsError) as exc:
            with self._lock:
                self._held_changed = True  # still unsaved
            reason_text = getattr(exc, "strerror", None) or str(exc)
            with self._lock:
                first = self.disk_error is None
                self.disk_error = reason_text
                if first:
                    self._event("checkpoint", f"checkpoint v{snap.version} failed: {reason_text}")
            if first:
                log.error(
                    "checkpoint v%d could not be written to %s (%s): new updates get 503 "
                    "until a write succeeds; retrying",
                    snap.version,
                    self.settings.model_dir,
                    reason_text,
                )
            self._measure("checkpoint_failed")
            return None
        with self._lock:
            if self.disk_error is not None:
                log.info("checkpoints can be written again: taking updates")
                self._event("checkpoint", "checkpoints can be written again")
            self.disk_error = None
            unsaved = view.updates_total - self._saved_updates
            self._saved_version, self._saved_updates = snap.version, view.updates_total
            self._last_checkpoint = {"version": snap.version, "time": view.metadata["time"]}
            self._event("checkpoint", f"checkpoint v{snap.version} ({reason})")
        self._measure("checkpoint", seconds=time.perf_counter() - started)
        log.info(
            "checkpoint v%d written to %s (%s; %d samples, %d updates since the last)",
            snap.version,
            path,
            reason,
            snap.samples,
            unsaved,
        )
        return path

    def _save_view(self) -> _SaveView:
        """What a checkpoint of the current version holds. Caller holds _lock."""
        snap = self.snapshot
        recent: list[str] = []
        size = 2
        for update_id in reversed(self._applied):
            size += len(json.dumps(update_id)) + 2
            if len(recent) == SAVED_IDS or size > SAVED_IDS_BYTES:
                break
            recent.append(update_id)
        recent.reverse()
        metadata: dict[str, object] = {
            # Updates a buffering rule holds: in its saved buffer, so counted once on resume.
            "held": json.dumps(
                [
                    [u.update_id, u.client_id, u.num_samples, u.base_version, u.task_id]
                    for u in self._held
                ]
            ),
            "samples": snap.samples,
            "model": self.settings.model,
            "strategy": self.strategy.name,
            "strategy_state": json.dumps(self.strategy.state_dict()),
            "tasks_state": json.dumps(self.queue.state_dict()),
            "updates": self._updates_total,
            "applied_ids": json.dumps(recent),
            "time": _iso(self._wall()),
        }
        rule = {
            checkpoints.STRATEGY_PREFIX + name: tensor
            for name, tensor in self.strategy.tensor_state().items()
        }
        return _SaveView(snap, metadata, self._updates_total, rule)

    # --- status -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._lock:
            now = self._clock()
            self._tick_locked(now)
            snap = self.snapshot
            queue_status = self.queue.status()
            s = self.settings
            return {
                "version": snap.version,
                "samples": snap.samples,
                "model": s.model,
                "strategy": self.strategy.name,
                "mode": self.strategy.mode,
                "partition": dict(self.manifest["settings"]),
                "finished": self.queue.finished,
                "round": queue_status.pop("round", None),
                "run": {
                    "rounds": s.rounds,
                    "clients_per_round": s.per_round,
                    "logical_clients": len(self._clients),
                    # Round rules score every round; asynchronous ones every EVAL_EVERY versions.
                    "eval_every": 1 if self.strategy.mode == "rounds" else s.evaluate_every,
                    "task_timeout": s.task_timeout,
                },
                "updates": self._updates_total,
                "pending_updates": (
                    len(self.queue.round.updates)
                    if isinstance(self.queue, tasks.RoundQueue) and self.queue.round
                    else len(self._held)
                ),
                "unsaved_updates": self._updates_total - self._saved_updates,
                # copies: JSON is made unlocked
                "clients": [dict(c) for c in self._clients.values()]
                + [dict(c) for c in self._others.values()],
                "workers": queue_status["workers"],
                "evaluations_pending": queue_status["evaluations_pending"],
                "history": list(self._recent),
                "events": list(self._events),
                "last_checkpoint": dict(self._last_checkpoint),
            }

    def history(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(e) for e in self._history]

    def summary(self) -> dict[str, Any]:
        """The essentials the dashboard renders without JavaScript."""
        with self._lock:
            last = self._history[-1] if self._history else None
            return {
                "version": self.snapshot.version,
                "strategy": self.strategy.name,
                "model": self.settings.model,
                "partition": self.settings.partition,
                "last_accuracy": last["accuracy"] if last else None,
                "last_round": last["round"] if last else None,
                "finished": self.queue.finished,
            }

    def lookup(self, update_id: str, seq: int | None = None) -> dict[str, Any]:
        """What became of an update: `state` saved, applied, pending or unknown.

        saved: folded into a version that is in a checkpoint on disk; applied: in
        the served model, not yet checkpointed; pending: in an open round;
        unknown: never received, lost in a crash, or forgotten.

        A task's update id is its task id, and the task queue knows for every task
        of the run whether it is done, across restarts: a done task whose id is
        not remembered here was saved before the last restart. A hand-started
        client's update carries its own id; every aggregated update gets a
        sequence number (`seq`, returned by POST /v1/updates), and the ids
        remembered are the most recent ones, numbers `first`..`updates_total`
        (a checkpoint saves the last SAVED_IDS of them). So an unknown id asked
        with its `seq` is `forgotten` (certainly saved: drop it) when seq < first,
        else lost (push it again); this never counts an update twice, and an
        update lost in a crash reads as forgotten only once more than SAVED_IDS
        later updates have been checkpointed before its client asks.
        """
        with self._lock:
            known = self._applied.get(update_id)
            if known is not None:
                version, number = known
                state = "saved" if version <= self._saved_version else "applied"
                return {"update_id": update_id, "state": state, "version": version, "seq": number}
            queue = self.queue
            if any(u.update_id == update_id for u in self._held):
                return {"update_id": update_id, "state": "pending", "version": None, "seq": None}
            if isinstance(queue, tasks.RoundQueue) and queue.is_done(update_id):
                return {"update_id": update_id, "state": "pending", "version": None, "seq": None}
            if queue.is_done(update_id):
                return {
                    "update_id": update_id,
                    "state": "saved",
                    "version": self._saved_version,
                    "seq": None,
                }
            first = (
                next(iter(self._applied.values()))[1] if self._applied else self._updates_total + 1
            )
            return {
                "update_id": update_id,
                "state": "unknown",
                "forgotten": seq is not None and seq < first,
                "remembered_from": first,
            }

    def info(self) -> tuple[int, bool]:
        """(version, finished), for error bodies."""
        return self.snapshot.version, self.queue.finished
