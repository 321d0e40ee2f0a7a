"""The aggregator's global state, shared by the request threads of its one process.

The served model is a `Snapshot`: weights plus their safetensors bytes, encoded
once per version and never changed. A new version swaps the reference under
`_lock`; readers take the current reference without locking, so downloads never
wait on uploads and never see a half-written model. Checkpoints are written
outside `_lock` (under `_save_lock`, which only serializes disk writes), from a
consistent view captured under it.
"""

from __future__ import annotations

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
from fedsim.aggregator import strategies
from fedsim.aggregator.strategies import Aggregate, Global, Update
from fedsim.config import Settings
from fedsim.models import SHAPES

log = logging.getLogger("fedsim.aggregator")

REMEMBERED_IDS = 100_000  # applied update ids kept in memory for dedup (~15 MB at most)
SAVED_IDS = 256  # the most recent of them saved in a checkpoint, for dedup after a restart
SAVED_IDS_BYTES = 32_000  # and at most this much JSON: a checkpoint header must stay < 64 kB
HISTORY = 20  # recent aggregated updates shown by /v1/status
MAX_CLIENTS_SHOWN = 1000  # clients remembered for /v1/status, least recently seen dropped


class StartupError(RuntimeError):
    """The aggregator cannot start from what is in MODEL_DIR."""


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Snapshot:
    """One immutable version of the global model, with its bytes as served."""

    version: int
    samples: int
    tensors: Mapping[str, np.ndarray]
    body: bytes

    @property
    def etag(self) -> str:
        return str(self.version)

    @classmethod
    def of(cls, tensors: Mapping[str, np.ndarray], version: int, samples: int, model: str):
        frozen = {}
        for name, tensor in tensors.items():
            tensor = np.ascontiguousarray(tensor, dtype=np.float32)
            tensor.flags.writeable = False  # shared by readers: nobody may change it in place
            frozen[name] = tensor
        body = weights.encode(frozen, {"version": version, "samples": samples, "model": model})
        return cls(version, samples, frozen, body)


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


class State:
    """Global model, strategy, dedup ids, clients seen, history and checkpoint schedule."""

    def __init__(
        self,
        settings: Settings,
        *,
        snapshot: Snapshot,
        strategy: strategies.Strategy,
        applied_ids: list[str],
        updates_total: int,
        last_checkpoint: dict[str, Any] | None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.layout = SHAPES[settings.model]
        self.strategy = strategy
        self.snapshot = snapshot  # swapped, never mutated
        self._clock, self._wall = clock, wall
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        # Applied update id -> (version that included it, its sequence number). The
        # ids restored from a checkpoint are its most recent ones, in order, so the
        # last of them is number `updates_total`; their version is the checkpoint's.
        first_seq = updates_total - len(applied_ids) + 1
        self._applied: OrderedDict[str, tuple[int, int]] = OrderedDict(
            (update_id, (snapshot.version, first_seq + i))
            for i, update_id in enumerate(applied_ids)
        )
        self._pending: set[str] = set()
        self._updates_total = updates_total  # updates folded into the global model, ever
        self._clients: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self._saved_version = snapshot.version
        self._saved_updates = updates_total
        self._last_checkpoint = last_checkpoint
        self._changed_at = clock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

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
        model_dir = settings.model_dir
        ckpt = checkpoints.load_newest(model_dir)
        if ckpt is None:
            raise StartupError(
                f"no checkpoint in {model_dir}: run `python -m fedsim.prepare` "
                "(or `docker compose up`, which runs the prepare service) first"
            )
        meta = ckpt.metadata
        if meta.get("model", settings.model) != settings.model:
            raise StartupError(
                f"checkpoint {ckpt.path} holds model {meta['model']!r} but MODEL={settings.model};"
                f" set MODEL={meta['model']} or use an empty MODEL_DIR"
            )
        try:
            weights.validate(ckpt.tensors, SHAPES[settings.model])
        except weights.WeightsError as exc:
            raise StartupError(
                f"checkpoint {ckpt.path} does not fit MODEL={settings.model}: {exc.reason}"
            ) from None
        samples = _int_meta(meta, "samples")
        strategy = strategies.build(settings)
        if meta.get("strategy") == strategy.name:
            try:
                strategy.load_state_dict(json.loads(meta.get("strategy_state", "{}")))
            except (ValueError, AttributeError) as exc:
                raise StartupError(
                    f"checkpoint {ckpt.path} has bad strategy_state: {exc}"
                ) from None
        elif "strategy" in meta:
            log.info(
                "checkpoint was made by %s; %s starts fresh from its weights",
                meta["strategy"],
                strategy.name,
            )
        try:
            applied = [str(i) for i in json.loads(meta.get("applied_ids", "[]"))]
        except (ValueError, TypeError):
            log.warning("checkpoint %s has unreadable applied_ids; dedup starts empty", ckpt.path)
            applied = []
        snapshot = Snapshot.of(ckpt.tensors, ckpt.version, samples, settings.model)
        mtime = ckpt.path.stat().st_mtime
        log.info(
            "resumed from %s: version %d, %d samples, model %s, strategy %s%s",
            ckpt.path,
            ckpt.version,
            samples,
            settings.model,
            strategy.name,
            " (finished)" if strategy.finished else "",
        )
        return cls(
            settings,
            snapshot=snapshot,
            strategy=strategy,
            applied_ids=applied,
            updates_total=_int_meta(meta, "updates"),
            last_checkpoint={"version": ckpt.version, "path": str(ckpt.path), "time": _iso(mtime)},
            clock=clock,
            wall=wall,
        )

    # --- updates ------------------------------------------------------------------

    def submit(self, update: Update) -> Result:
        """Aggregate a validated update once. Raises strategies.Refused (nothing changes then)."""
        with self._lock:
            now = self._clock()
            self._tick_locked(now)
            if update.update_id in self._applied or update.update_id in self._pending:
                log.info(
                    "duplicate update %s from client %s acknowledged, not aggregated again",
                    update.update_id,
                    update.client_id,
                )
                known = self._applied.get(update.update_id)
                return Result(self.snapshot.version, True, known[1] if known else None)
            aggregate = self.strategy.accept(update, self._global(), now)
            # Accepted: from here on nothing raises.
            self._see_client(update)
            if aggregate is None:
                self._pending.add(update.update_id)
                info = self.strategy.status(self._global(), now) or {}
                log.info(
                    "accepted update from client %s slice %s: base v%d -> round %s (%d/%d), "
                    "%d samples, loss %s, accuracy %s",
                    update.client_id,
                    update.meta.get("slice", "-"),
                    update.base_version,
                    info.get("number", "?"),
                    info.get("pending", 0),
                    info.get("quorum", 0),
                    update.num_samples,
                    _metric(update.meta.get("loss")),
                    _metric(update.meta.get("accuracy")),
                )
            else:
                self._apply(aggregate, now)
                if aggregate.updates == (update,):
                    log.info(
                        "accepted update from client %s slice %s: base v%d -> v%d, %d samples, "
                        "loss %s, accuracy %s, total %d samples",
                        update.client_id,
                        update.meta.get("slice", "-"),
                        update.base_version,
                        self.snapshot.version,
                        update.num_samples,
                        _metric(update.meta.get("loss")),
                        _metric(update.meta.get("accuracy")),
                        self.snapshot.samples,
                    )
            known = self._applied.get(update.update_id)
            return Result(self.snapshot.version, False, known[1] if known else None)

    def _global(self) -> Global:
        snap = self.snapshot
        return Global(snap.tensors, snap.version, snap.samples)

    def _apply(self, aggregate: Aggregate, now: float) -> None:
        """Make `aggregate` the next version. Caller holds _lock."""
        old = self.snapshot
        added = sum(u.num_samples for u in aggregate.updates)
        new = Snapshot.of(
            aggregate.tensors, old.version + 1, old.samples + added, self.settings.model
        )
        self.snapshot = new
        self._changed_at = now
        stamp = _iso(self._wall())
        for u in aggregate.updates:
            self._updates_total += 1
            self._pending.discard(u.update_id)
            self._applied[u.update_id] = (new.version, self._updates_total)
            self._history.append(
                {
                    "client_id": u.client_id,
                    "update_id": u.update_id,
                    "slice": u.meta.get("slice"),
                    "base_version": u.base_version,
                    "version": new.version,
                    "samples": u.num_samples,
                    "time": stamp,
                }
            )
        while len(self._applied) > REMEMBERED_IDS:
            self._applied.popitem(last=False)
        if aggregate.reason != "update":
            log.info(
                "%s: %d updates, %d samples -> v%d, total %d samples%s",
                aggregate.reason,
                len(aggregate.updates),
                added,
                new.version,
                new.samples,
                "; run finished" if self.strategy.finished else "",
            )

    def _see_client(self, update: Update) -> None:
        record = self._clients.pop(update.client_id, None) or {"id": update.client_id, "updates": 0}
        record["updates"] += 1
        record["last_seen"] = _iso(self._wall())
        record["base_version"] = update.base_version
        for key in ("slices", "slice", "loss", "accuracy", "retries"):
            if key in update.meta:
                record[key] = update.meta[key]
        self._clients[update.client_id] = record
        while len(self._clients) > MAX_CLIENTS_SHOWN:
            self._clients.popitem(last=False)

    # --- time ---------------------------------------------------------------------

    def _tick_locked(self, now: float) -> None:
        aggregate = self.strategy.tick(self._global(), now)
        if aggregate is not None:
            self._apply(aggregate, now)

    def poll(self) -> Snapshot:
        """The current snapshot, closing a timed-out round first (lock taken only then)."""
        deadline = self.strategy.deadline()
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
        if self.snapshot.version <= self._saved_version:
            return None
        if force:
            return "shutdown"
        if self.strategy.finished:
            return "run finished"
        # SAVE_MODEL counts aggregated updates, not versions: a fedavg round is one
        # version made of several updates.
        if self._updates_total - self._saved_updates >= self.settings.save_model:
            return f"SAVE_MODEL={self.settings.save_model}"
        if now - self._changed_at >= self.settings.idle_save_seconds:
            return "idle"
        return None

    def save_if_due(self, *, force: bool = False, wait: bool = True) -> Path | None:
        """Write a checkpoint when one is due; with wait=False skip if a write is running."""
        if not self._save_lock.acquire(blocking=wait):
            return None
        try:
            with self._lock:
                reason = self._save_reason(self._clock(), force)
                if reason is None:
                    return None
                view = self._save_view()
            snap = view.snapshot
            path = checkpoints.save(
                self.settings.model_dir,
                snap.version,
                snap.tensors,
                view.metadata,
                keep=self.settings.keep_checkpoints,
            )
            with self._lock:
                unsaved = view.updates_total - self._saved_updates
                self._saved_version, self._saved_updates = snap.version, view.updates_total
                self._last_checkpoint = {
                    "version": snap.version,
                    "path": str(path),
                    "time": view.metadata["time"],
                }
            log.info(
                "checkpoint v%d written to %s (%s; %d samples, %d updates since the last)",
                snap.version,
                path,
                reason,
                snap.samples,
                unsaved,
            )
            return path
        finally:
            self._save_lock.release()

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
            "samples": snap.samples,
            "model": self.settings.model,
            "strategy": self.strategy.name,
            "strategy_state": json.dumps(self.strategy.state_dict()),
            "updates": self._updates_total,
            "applied_ids": json.dumps(recent),
            "time": _iso(self._wall()),
        }
        return _SaveView(snap, metadata, self._updates_total)

    # --- status -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._lock:
            now = self._clock()
            self._tick_locked(now)
            snap = self.snapshot
            return {
                "version": snap.version,
                "samples": snap.samples,
                "model": self.settings.model,
                "strategy": self.strategy.name,
                "finished": self.strategy.finished,
                "round": self.strategy.status(self._global(), now),
                "updates": self._updates_total,
                "pending_updates": self.strategy.pending(),
                "unsaved_updates": self._updates_total - self._saved_updates,
                "clients": [
                    dict(c) for c in self._clients.values()
                ],  # copies: JSON is made unlocked
                "history": list(self._history),
                "last_checkpoint": self._last_checkpoint,
            }

    def lookup(self, update_id: str, seq: int | None = None) -> dict[str, Any]:
        """What became of an update: `state` saved, applied, pending or unknown.

        saved: folded into a version that is in a checkpoint on disk; applied: in
        the served model, not yet checkpointed; pending: held by the strategy (an
        open fedavg round); unknown: never received, lost in a crash, or forgotten.

        Every aggregated update gets a sequence number, `updates_total` just after
        it was folded in (returned as `seq` by POST /v1/updates and here). The ids
        remembered are always the most recent ones, numbers `first`..`updates_total`
        (a checkpoint saves the last SAVED_IDS of them and `updates_total`; memory
        drops the oldest past REMEMBERED_IDS). So an unknown id asked with its `seq`
        is `forgotten` (certainly saved: drop it) when seq < first, else lost (push
        it again).

        Why this never counts an update twice: if an update is in the current model,
        it was numbered in the chain of states that led to this one, and numbers grow
        along that chain; every id of that chain numbered >= first is remembered. So
        an update in the model whose id is not remembered has seq < first and is
        answered forgotten, never lost; a re-push of a remembered id is a duplicate.
        The reverse mistake is possible but bounded: numbers after the newest
        checkpoint are handed out again after a crash, so an update lost in a crash
        reads as forgotten only once more than SAVED_IDS later updates have been
        checkpointed (or REMEMBERED_IDS have been made) before its client asks, which
        loses it rather than counting it twice. Without `seq`, an unknown id is never
        forgotten; clients learn their `seq` from the push's answer, or for a fedavg
        round from a lookup, and a fedavg re-push of an old round is refused as stale.
        """
        with self._lock:
            known = self._applied.get(update_id)
            if known is not None:
                version, number = known
                state = "saved" if version <= self._saved_version else "applied"
                return {"update_id": update_id, "state": state, "version": version, "seq": number}
            if update_id in self._pending:
                return {"update_id": update_id, "state": "pending", "version": None, "seq": None}
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
        return self.snapshot.version, self.strategy.finished


def _int_meta(meta: Mapping[str, str], key: str) -> int:
    try:
        return max(0, int(meta.get(key, "0")))
    except ValueError:
        raise StartupError(f"checkpoint metadata {key}={meta[key]!r} is not an integer") from None


def _metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
