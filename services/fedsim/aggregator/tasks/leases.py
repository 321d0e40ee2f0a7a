"""Workers and leases: who holds which task, until when.

A worker is a process known by the id it sends (host, pid, random) and shown by
a short name (w1, w2, ... in order of first contact). A task handed out holds a
lease: a token and an expiry TASK_TIMEOUT later. A result counts only under the
task's current lease; a lease that runs out frees the task for another worker,
and its (task, worker) is kept for the events until drained.

A lease is a random nonce (secrets.token_hex) and an HMAC of (task id, nonce)
under the aggregator's lease key: only the worker the task was handed
to can present one, since task ids are predictable and leases are not, and it
is recognised after a restart too (the key is kept in MODEL_DIR/leases.key,
mode 0600), so a worker's result pushed again from its outbox still counts.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedsim.aggregator.strategies import Refused
from fedsim.checkpoints import write_atomic

WORKER_LIVE_SECONDS = 60.0  # a worker not heard from for this long is no longer counted
MAX_WORKERS = 10_000  # worker records kept; the least recently seen go first
KEY_FILE = "leases.key"  # in MODEL_DIR: 64 hex digits
_NONCE = 12  # random bytes of a lease: 24 hex digits, then 40 of its HMAC (64 in all, as
_MAC = 20  # the protocol's lease grammar has always allowed)


@dataclass
class Lease:
    token: str
    worker: str  # the worker's short name
    expires: float


@dataclass
class Worker:
    name: str  # w1, w2, ... in order of first contact
    last_seen: float
    task: str | None = None
    client: str | None = None
    tasks_done: int = 0
    retries: int = 0
    trained: int = 0  # training tasks received, done or not


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def lease_key(model_dir: Path) -> bytes:
    """The key leases are signed with: MODEL_DIR/leases.key, made on first use (mode 0600).
    A file that is not 64 hex digits is replaced: leases handed out before are then refused,
    and their tasks go to workers again."""
    path = model_dir / KEY_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, ValueError):
        text = ""
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        return bytes.fromhex(text)
    key = secrets.token_bytes(32)
    model_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, key.hex().encode() + b"\n")  # mkstemp: mode 0600
    return key


class Leases:
    """The worker registry and the leases of the tasks handed out."""

    def __init__(
        self,
        *,
        task_timeout: float,
        clock: Callable[[], float],
        wall: Callable[[], float],
        key: bytes | None = None,
    ) -> None:
        self.task_timeout = task_timeout
        self._clock, self._wall = clock, wall
        # None: a key of this process alone (its leases are not recognised after a restart).
        self._key = key or secrets.token_bytes(32)
        self.leases: dict[str, Lease] = {}  # by task id
        self.workers: dict[str, Worker] = {}  # by the id the worker sent, least recent first
        self._names = 0
        self._expired: list[tuple[str, str]] = []  # (task, worker) of leases that ran out
        # Per open task, how often it was given back or its lease ran out: the attempt of
        # its next lease, from which a dropout is drawn anew (fedsim.data.population).
        self.attempts: dict[str, int] = {}

    # --- workers --------------------------------------------------------------------

    def worker(self, uid: str, now: float) -> Worker:
        """The record of worker `uid`, made on first contact, marked seen `now`."""
        record = self.workers.pop(uid, None)
        if record is None:
            self._names += 1
            record = Worker(f"w{self._names}", now)
        record.last_seen = now
        self.workers[uid] = record  # most recently seen last
        while len(self.workers) > MAX_WORKERS:
            self.workers.pop(next(iter(self.workers)))
        return record

    def live_workers(self, now: float) -> int:
        """Workers heard from within WORKER_LIVE_SECONDS."""
        return sum(1 for w in self.workers.values() if now - w.last_seen < WORKER_LIVE_SECONDS)

    def workers_status(self) -> list[dict[str, Any]]:
        now, wall = self._clock(), self._wall()
        return [
            {
                "id": w.name,
                "task": w.task,
                "client": w.client,
                "tasks_done": w.tasks_done,
                "retries": w.retries,
                "last_seen": _iso(wall - (now - w.last_seen)),
            }
            for w in self.workers.values()
        ]

    # --- leases ---------------------------------------------------------------------

    def _expire(self, now: float) -> list[str]:
        """Drop the leases with expires <= now; their tasks."""
        gone = [task for task, lease in self.leases.items() if lease.expires <= now]
        for task in gone:
            self._expired.append((task, self.leases.pop(task).worker))
            self.attempts[task] = self.attempts.get(task, 0) + 1
        return gone

    def drain_expired(self) -> list[tuple[str, str]]:
        """(task, worker) of the leases that ran out since the last call."""
        out, self._expired = self._expired, []
        return out

    def _sign(self, task_id: str, nonce: str) -> str:
        mac = hmac.new(self._key, f"{task_id}\n{nonce}".encode(), hashlib.sha256)
        return mac.hexdigest()[: 2 * _MAC]

    def genuine(self, task_id: str, lease: str) -> bool:
        """Whether `lease` is one this aggregator handed out with `task_id` (now or before a
        restart): compared in constant time, it needs no record of the lease."""
        size = 2 * _NONCE
        if len(lease) != size + 2 * _MAC or not lease.isascii():
            return False
        return hmac.compare_digest(lease[size:], self._sign(task_id, lease[:size]))

    def check_genuine(self, task_id: str, lease: str) -> None:
        """Refuse a result under a lease that was never handed out with `task_id`."""
        if not self.genuine(task_id, lease):
            raise Refused(
                "not_leased",
                f"this lease was not handed out with task {task_id}: only the worker that "
                "holds the task may send its result, which is not counted",
            )

    def _lease(self, task_id: str, worker: Worker, now: float) -> str:
        """Give `task_id` to `worker` until now + TASK_TIMEOUT; the lease's token."""
        nonce = secrets.token_hex(_NONCE)
        token = nonce + self._sign(task_id, nonce)
        self.leases[task_id] = Lease(token, worker.name, now + self.task_timeout)
        worker.task = task_id
        return token

    def _check_lease(self, task_id: str, lease: str) -> None:
        """Refuse a result under a lease that is not the task's current one."""
        current = self.leases.get(task_id)
        if current is not None and current.token != lease:
            raise Refused(
                "reassigned",
                f"task {task_id} was given to worker {current.worker} after this lease "
                f"ran out (TASK_TIMEOUT={self.task_timeout:g}s); its result is not counted",
            )

    def _release(self, task_id: str, lease: str) -> None:
        """The task is done under `lease`: free it and count it for its worker."""
        current = self.leases.get(task_id)
        self.attempts.pop(task_id, None)
        if current is not None and current.token == lease:
            del self.leases[task_id]
            for w in self.workers.values():
                if w.name == current.worker:
                    w.tasks_done += 1
                    if w.task == task_id:
                        w.task = None

    def _revoke(self, task_id: str) -> None:
        """Take `task_id` back without counting it (its round closed without it)."""
        if self.leases.pop(task_id, None) is not None:
            for w in self.workers.values():
                if w.task == task_id:
                    w.task = None

    def give_back(self, task_id: str, lease: str) -> tuple[str, str | None, int]:
        """Take back a task whose worker's client dropped it (DROPOUT_MODE=abort), so the
        next worker to ask gets it; (the worker's name, its client, the attempt that
        dropped). Refused when `lease` is not the task's current one."""
        self._expire(self._clock())
        self.check_genuine(task_id, lease)
        current = self.leases.get(task_id)
        if current is None or current.token != lease:
            raise Refused(
                "not_held",
                f"task {task_id} is not held under this lease (done, or its lease ran out): "
                "there is nothing to give back",
            )
        attempt = self.attempts.get(task_id, 0)
        self.attempts[task_id] = attempt + 1
        held = [w for w in self.workers.values() if w.task == task_id]
        self._revoke(task_id)
        return current.worker, held[0].client if held else None, attempt

    def attempts_state(self) -> dict[str, int]:
        """The attempts of the open tasks, saved with the checkpoint."""
        return dict(self.attempts)

    def load_attempts(self, saved: object) -> None:
        """The attempts a checkpoint saved; none (an older checkpoint) or bad ones count 0."""
        self.attempts = {}
        if isinstance(saved, dict):
            self.attempts = {
                str(k): v
                for k, v in saved.items()
                if isinstance(v, int) and not isinstance(v, bool) and 0 < v < 10**6
            }
