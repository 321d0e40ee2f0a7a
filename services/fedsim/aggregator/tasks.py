"""The task queue: the aggregator decides which logical client trains what, and when to score.

A worker asks for work and gets a task with a lease; it finishes the task within
TASK_TIMEOUT or the task goes to another worker, and a result under the old
lease is refused. Task ids are deterministic, so an id names the same piece of
work after a restart, and an update is counted once however often it is pushed:

- `c2.s5`: PARTITION=slices under an asynchronous rule: logical client 2 trains
  its slice 5. Each client trains its slices in order, one task at a time, and
  keeps the worker that took it (affinity), so with as many workers as ranges
  every worker trains one client for the whole run, like the original.
- `u42.c17`: other partitions under an asynchronous rule: update 42 of the run,
  by client 17. The clients of updates (b-1)*C+1 .. b*C are round b's sample, so
  asynchronous runs train the same clients as round rules; the run ends after
  ROUNDS x C updates.
- `r3.c17`: round rules: client 17's update in round 3. Round r samples C
  clients with a generator seeded by (SEED, r): the same clients whatever the
  number of workers or restarts. Under PARTITION=slices a client trains slice
  number (r - 1) mod (its slice count) of its range in round r.
- `eval.v12`: score version 12 on the test set. Evaluations go first.

The queue holds no weights: the state (state.py) applies or buffers updates.
Its progress is saved in checkpoints (`state_dict`), so a restart resumes it.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from fedsim.aggregator.strategies import Refused

WORKER_LIVE_SECONDS = 60.0  # a worker not heard from for this long is no longer counted
MAX_WORKERS = 10_000  # worker records kept; the least recently seen go first
_N = r"(0|[1-9][0-9]*)"  # ASCII, no leading zeros: one spelling per task id
_TASK = re.compile(rf"^(?:c{_N}\.s{_N}|u{_N}\.c{_N}|r{_N}\.c{_N}|eval\.v{_N})$")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Client:
    """A logical client as the manifest (partitions.json) describes it."""

    number: int  # 1-based: client-<number>
    samples: int
    sha256: str
    slices: tuple[int, int] | None = None  # PARTITION=slices: its inclusive range

    @property
    def id(self) -> str:
        return f"client-{self.number}"

    @property
    def slice_numbers(self) -> range:
        assert self.slices is not None
        return range(self.slices[0], self.slices[1] + 1)


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


@dataclass(frozen=True)
class Offer:
    """The answer to a worker's request for work: a task, or why there is none."""

    task: dict[str, Any] | None
    finished: bool = False
    surplus: bool = False
    reason: str = ""
    retry_after: float = 0.5


def sample(seed: int, round_no: int, k: int, n: int) -> list[int]:
    """Round `round_no`'s k distinct clients out of n (1-based, ascending), seeded by (seed, round)."""
    rng = np.random.default_rng([seed, round_no])
    return sorted(int(i) + 1 for i in rng.choice(n, size=k, replace=False))


def choose_attackers(seed: int, k: int, n: int) -> list[int]:
    """The k attacking clients out of n (1-based, ascending), seeded by SEED alone."""
    if k == 0:
        return []
    rng = np.random.default_rng([seed, 0xA77AC])
    return sorted(int(i) + 1 for i in rng.choice(n, size=k, replace=False))


def task_seed(seed: int, task_id: str) -> int:
    """The seed a worker trains a task with: the same for a task whichever worker takes it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{task_id}".encode()).digest()[:4], "big") >> 1


def _ranges(numbers: Sequence[int]) -> str:
    """1 2 3 5 -> '1-3,5': a compact, header-friendly form of a set of task numbers."""
    out, numbers = [], sorted(numbers)
    i = 0
    while i < len(numbers):
        j = i
        while j + 1 < len(numbers) and numbers[j + 1] == numbers[j] + 1:
            j += 1
        out.append(str(numbers[i]) if i == j else f"{numbers[i]}-{numbers[j]}")
        i = j + 1
    return ",".join(out)


def _unranges(text: str, limit: int) -> set[int]:
    """The numbers of `_ranges(...)` up to `limit` (a range past it is clamped first)."""
    out: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), min(int(hi or lo), limit) + 1))
    return out


class Queue:
    """Leases, workers and evaluations; the training plan is the subclass's."""

    kind = ""

    def __init__(
        self,
        clients: Sequence[Client],
        *,
        seed: int,
        per_round: int,
        rounds: int,
        task_timeout: float,
        training: Mapping[str, Any],
        partition: Mapping[str, Any],
        clock: Callable[[], float],
        wall: Callable[[], float],
        attack: Mapping[str, Any] | None = None,
        attackers: Sequence[int] = (),
    ) -> None:
        self.clients = {c.number: c for c in clients}
        self.attack = dict(attack) if attack else None  # {"kind", "scale"}, for the attackers
        self.attackers = frozenset(attackers)
        self.seed, self.per_round, self.rounds = seed, per_round, rounds
        self.task_timeout = task_timeout
        self.training = dict(training)  # epochs, batch size, learning rate, optimizer, ...
        self.partition = dict(partition)
        self._clock, self._wall = clock, wall
        self.leases: dict[str, Lease] = {}
        self.workers: dict[str, Worker] = {}  # by the id the worker sent
        self._names = 0
        self.evals: list[int] = []  # versions waiting to be scored, oldest first
        self._expired: list[tuple[str, str]] = []  # (task, worker) of leases that ran out

    # --- workers --------------------------------------------------------------------

    def worker(self, uid: str, now: float) -> Worker:
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
        return sum(1 for w in self.workers.values() if now - w.last_seen < WORKER_LIVE_SECONDS)

    # --- leases ---------------------------------------------------------------------

    def _expire(self, now: float) -> list[str]:
        gone = [task for task, lease in self.leases.items() if lease.expires <= now]
        for task in gone:
            self._expired.append((task, self.leases.pop(task).worker))
        return gone

    def drain_expired(self) -> list[tuple[str, str]]:
        """(task, worker) of the leases that ran out since the last call."""
        out, self._expired = self._expired, []
        return out

    def _lease(self, task_id: str, worker: Worker, now: float) -> str:
        token = secrets.token_hex(8)
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
        current = self.leases.get(task_id)
        if current is not None and current.token == lease:
            del self.leases[task_id]
            for w in self.workers.values():
                if w.name == current.worker:
                    w.tasks_done += 1
                    if w.task == task_id:
                        w.task = None

    # --- asking -----------------------------------------------------------------------

    def ask(self, uid: str, version: int, retries: int = 0) -> tuple[Offer, Worker]:
        now = self._clock()
        worker = self.worker(uid, now)
        worker.retries = max(worker.retries, retries)
        self._expire(now)
        for v in self.evals:
            task_id = f"eval.v{v}"
            if task_id not in self.leases:
                lease = self._lease(task_id, worker, now)
                worker.client = None
                task = {"id": task_id, "lease": lease, "kind": "evaluate", "version": v}
                return Offer(self._stamp(task, worker)), worker
        offer = self._training(worker, version, now, uid)
        if offer.task is not None:
            offer.task.update(self._stamp(offer.task, worker))
        return offer, worker

    def _stamp(self, task: dict[str, Any], worker: Worker) -> dict[str, Any]:
        task["worker"] = worker.name
        task["timeout"] = self.task_timeout
        return task

    def _train_task(
        self, task_id: str, client: Client, worker: Worker, now: float, version: int, **extra: Any
    ) -> dict[str, Any]:
        worker.client = client.id
        worker.trained += 1
        seed = task_seed(self.seed, task_id)
        if self.attack is not None and client.number in self.attackers:
            extra = {**extra, "attack": {**self.attack, "seed": seed}}
        return {
            "id": task_id,
            "lease": self._lease(task_id, worker, now),
            "kind": "train",
            "client": client.id,
            "samples": client.samples,
            "sha256": client.sha256,
            "base_version": version,
            "seed": seed,
            "train": self.training,
            "partition": self.partition,
            **extra,
        }

    def _training(self, worker: Worker, version: int, now: float, uid: str) -> Offer:
        raise NotImplementedError

    # --- results ----------------------------------------------------------------------

    def check_update(
        self,
        task_id: str,
        lease: str,
        client_id: str,
        base_version: int,
        version: int,
        num_samples: int,
    ) -> bool:
        """Whether an update for `task_id` may count: True new, False already counted.

        Raises Refused for a task not in this run, a lease that was reassigned, a
        closed round or a finished run, and for more samples than the task holds.
        """
        self._expire(self._clock())
        match = _TASK.fullmatch(task_id)
        client = self._client_of(task_id)
        if match is None or client is None or task_id.startswith("eval."):
            raise Refused("unknown_task", f"task {task_id} is not a training task of this run")
        if client.id != client_id:
            raise Refused("wrong_client", f"task {task_id} is {client.id}'s, not {client_id}'s")
        held = client.samples // len(client.slice_numbers) if client.slices else client.samples
        if num_samples > held:
            raise Refused(
                "bad_num_samples",
                f"num_samples={num_samples} but task {task_id} holds {held} images",
                status=422,
            )
        if self._is_done(task_id):
            return False
        self._check_lease(task_id, lease)
        self._check_open(task_id, base_version, version)
        return True

    def record_update(self, task_id: str, lease: str) -> None:
        """The update of `task_id` was applied (or taken into the open round)."""
        self._release(task_id, lease)
        self._mark_done(task_id)

    def check_evaluation(self, task_id: str, lease: str) -> int:
        """The version an evaluation result is for; Refused when not wanted (any more)."""
        self._expire(self._clock())
        match = _TASK.fullmatch(task_id)
        if match is None or match.group(7) is None:
            raise Refused("unknown_task", f"task {task_id} is not an evaluation task")
        version = int(match.group(7))
        if version not in self.evals:
            raise Refused("task_done", f"version {version} is already scored or not wanted")
        self._check_lease(task_id, lease)
        return version

    def record_evaluation(self, task_id: str, lease: str, version: int) -> None:
        self._release(task_id, lease)
        if version in self.evals:
            self.evals.remove(version)

    def want_evaluation(self, version: int) -> None:
        if version not in self.evals:
            self.evals.append(version)

    def drop_evaluations(self, keep: int) -> list[int]:
        """Forget the oldest waiting evaluations not leased, beyond `keep`; the versions."""
        dropped = []
        for version in list(self.evals):
            if len(self.evals) <= keep:
                break
            if f"eval.v{version}" not in self.leases:
                self.evals.remove(version)
                dropped.append(version)
        return dropped

    @property
    def finished(self) -> bool:
        return self.training_done and not self.evals

    # --- per plan ----------------------------------------------------------------------

    @property
    def training_done(self) -> bool:
        raise NotImplementedError

    def _client_of(self, task_id: str) -> Client | None:
        raise NotImplementedError

    def _is_done(self, task_id: str) -> bool:
        raise NotImplementedError

    def _mark_done(self, task_id: str) -> None:
        raise NotImplementedError

    def _check_open(self, task_id: str, base_version: int, version: int) -> None:
        """Raise Refused when the task's result can no longer count (round rules)."""

    def is_done(self, task_id: str) -> bool:
        """Whether `task_id` is a training task of this run that is done (for lookups)."""
        return self._client_of(task_id) is not None and self._is_done(task_id)

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        now = self._clock()
        return {
            "workers": [
                {
                    "id": w.name,
                    "task": w.task,
                    "client": w.client,
                    "tasks_done": w.tasks_done,
                    "retries": w.retries,
                    "last_seen": _iso(self._wall() - (now - w.last_seen)),
                }
                for w in self.workers.values()
            ],
            "tasks_leased": len(self.leases),
            "evaluations_pending": list(self.evals),
        }


class SliceQueue(Queue):
    """PARTITION=slices under an asynchronous rule: each client's slices in order, with affinity."""

    kind = "slices"

    def __init__(self, clients: Sequence[Client], **kw: Any) -> None:
        super().__init__(clients, **kw)
        self.done = {c.number: 0 for c in clients}  # slices done per client
        self.owner: dict[int, str] = {}  # client -> worker name that trains it

    def _client_of(self, task_id: str) -> Client | None:
        match = _TASK.fullmatch(task_id)
        if match is None or match.group(1) is None:
            return None
        client = self.clients.get(int(match.group(1)))
        if client is None or int(match.group(2)) not in client.slice_numbers:
            return None
        return client

    def _position(self, task_id: str) -> tuple[Client, int]:
        client = self._client_of(task_id)
        assert client is not None
        return client, int(task_id.rsplit(".s", 1)[1]) - client.slices[0]

    def _is_done(self, task_id: str) -> bool:
        client, position = self._position(task_id)
        return position < self.done[client.number]

    def _check_open(self, task_id: str, base_version: int, version: int) -> None:
        client, position = self._position(task_id)
        if position != self.done[client.number]:
            next_slice = client.slices[0] + self.done[client.number]
            raise Refused(
                "out_of_order",
                f"{client.id} trains its slices in order: slice {next_slice} comes next",
            )

    def _mark_done(self, task_id: str) -> None:
        client, position = self._position(task_id)
        self.done[client.number] = max(self.done[client.number], position + 1)

    @property
    def training_done(self) -> bool:
        return all(self.done[n] == len(c.slice_numbers) for n, c in self.clients.items())

    def _training(self, worker: Worker, version: int, now: float, uid: str) -> Offer:
        live = {w.name for w in self.workers.values() if now - w.last_seen < self.task_timeout}
        waiting = [
            c
            for n, c in self.clients.items()
            if self.done[n] < len(c.slice_numbers)
            and f"c{n}.s{c.slices[0] + self.done[n]}" not in self.leases
        ]
        mine = [c for c in waiting if self.owner.get(c.number) == worker.name]
        free = [c for c in waiting if self.owner.get(c.number) not in live]
        pick = (mine or free or [None])[0]
        if pick is None:
            if self.training_done:
                return Offer(None, finished=not self.evals, reason="evaluating the last version")
            if self._surplus(worker, uid):
                return Offer(
                    None,
                    surplus=True,
                    reason=f"all {len(self.clients)} logical clients are trained by other workers",
                )
            return Offer(None, reason="waiting for the next slice")
        self.owner[pick.number] = worker.name
        slice_no = pick.slices[0] + self.done[pick.number]
        task = self._train_task(
            f"c{pick.number}.s{slice_no}",
            pick,
            worker,
            now,
            version,
            slice=slice_no,
            slices=f"{pick.slices[0]}-{pick.slices[1]}",
            samples=pick.samples // len(pick.slice_numbers),
            round=None,
        )
        return Offer(task)

    def _surplus(self, worker: Worker, uid: str) -> bool:
        """Whether this worker can leave: it never trained, and it is not a worker that
        came back (the same host) to take over what its earlier life held. A worker that
        has had work stays until the run is finished: another may die and leave its
        client to it (its lease runs out after TASK_TIMEOUT)."""
        if worker.trained or self.evals:
            return False
        host = uid.rsplit("-", 2)[0]
        return not any(
            other.rsplit("-", 2)[0] == host and record is not worker
            for other, record in self.workers.items()
        )

    def state_dict(self) -> dict[str, Any]:
        return {"slices_done": {str(n): d for n, d in self.done.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        done = state.get("slices_done", {})
        for key, value in dict(done).items():
            n = int(key)
            if n in self.clients and isinstance(value, int):
                self.done[n] = max(0, min(value, len(self.clients[n].slice_numbers)))


class SampledQueue(Queue):
    """Other partitions under an asynchronous rule: ROUNDS x C updates by sampled clients."""

    kind = "sampled"

    def __init__(self, clients: Sequence[Client], **kw: Any) -> None:
        super().__init__(clients, **kw)
        self.total = self.rounds * self.per_round
        self.done_numbers: set[int] = set()
        self._samples: dict[int, list[int]] = {}

    def client_number(self, n: int) -> int:
        block = (n - 1) // self.per_round + 1
        if block not in self._samples:
            self._samples = {block: sample(self.seed, block, self.per_round, len(self.clients))}
        return self._samples[block][(n - 1) % self.per_round]

    def _client_of(self, task_id: str) -> Client | None:
        match = _TASK.fullmatch(task_id)
        if match is None or match.group(3) is None:
            return None
        n = int(match.group(3))
        if not 1 <= n <= self.total or int(match.group(4)) != self.client_number(n):
            return None
        return self.clients[int(match.group(4))]

    def _is_done(self, task_id: str) -> bool:
        return int(task_id[1:].split(".", 1)[0]) in self.done_numbers

    def _mark_done(self, task_id: str) -> None:
        self.done_numbers.add(int(task_id[1:].split(".", 1)[0]))

    @property
    def training_done(self) -> bool:
        return len(self.done_numbers) >= self.total

    def _training(self, worker: Worker, version: int, now: float, uid: str) -> Offer:
        for n in range(1, self.total + 1):
            if n in self.done_numbers:
                continue
            number = self.client_number(n)
            task_id = f"u{n}.c{number}"
            if task_id in self.leases:
                continue
            return Offer(
                self._train_task(task_id, self.clients[number], worker, now, version, round=None)
            )
        if self.training_done:
            return Offer(None, finished=not self.evals, reason="evaluating the last version")
        return Offer(None, reason="the remaining updates are being trained")

    def state_dict(self) -> dict[str, Any]:
        return {"updates_done": _ranges(sorted(self.done_numbers))}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.done_numbers = _unranges(str(state.get("updates_done", "")), self.total)


@dataclass
class Round:
    number: int
    sampled: list[int]
    base_version: int
    opened_at: float | None = None  # when its first task was handed out
    updates: dict[int, Any] = field(default_factory=dict)  # client number -> the update


class RoundQueue(Queue):
    """Round rules: C sampled clients per round; the round closes when they are in, or on time."""

    kind = "rounds"

    def __init__(
        self, clients: Sequence[Client], *, quorum: int, round_timeout: float, **kw: Any
    ) -> None:
        super().__init__(clients, **kw)
        self.quorum, self.round_timeout = quorum, round_timeout
        self.rounds_done = 0
        self.round: Round | None = None

    def open_round(self, version: int) -> Round | None:
        """The open round, opening the next one at `version` when none is open."""
        if self.round is None and self.rounds_done < self.rounds:
            number = self.rounds_done + 1
            sampled = sample(self.seed, number, self.per_round, len(self.clients))
            self.round = Round(number, sampled, version)
        return self.round

    def _parse(self, task_id: str) -> tuple[int, int] | None:
        match = _TASK.fullmatch(task_id)
        if match is None or match.group(5) is None:
            return None
        return int(match.group(5)), int(match.group(6))

    def _client_of(self, task_id: str) -> Client | None:
        parsed = self._parse(task_id)
        if parsed is None or not 1 <= parsed[0] <= self.rounds:
            return None
        round_no, number = parsed
        if number not in sample(self.seed, round_no, self.per_round, len(self.clients)):
            return None
        return self.clients[number]

    def _is_done(self, task_id: str) -> bool:
        round_no, number = self._parse(task_id)  # type: ignore[misc]
        if round_no <= self.rounds_done:
            # A closed round's missing update is refused as stale, not a duplicate; whether
            # a closed round's update made it in, the state's applied ids know.
            return False
        return self.round is not None and number in self.round.updates

    def _check_open(self, task_id: str, base_version: int, version: int) -> None:
        if self.rounds_done >= self.rounds:
            raise Refused("finished", f"the run finished after {self.rounds} rounds", finished=True)
        round_no, _ = self._parse(task_id)  # type: ignore[misc]
        current = self.open_round(version)
        assert current is not None
        if round_no != current.number or base_version != current.base_version:
            raise Refused(
                "stale",
                f"task {task_id} is for round {round_no} on version {base_version}; round "
                f"{current.number} collects updates to version {current.base_version}",
            )

    def _mark_done(self, task_id: str) -> None:
        pass  # the state puts the update into the round (add_update)

    def add_update(self, task_id: str, update: Any, now: float) -> None:
        _, number = self._parse(task_id)  # type: ignore[misc]
        assert self.round is not None
        self.round.updates[number] = update
        if self.round.opened_at is None:
            self.round.opened_at = now

    def due(self, now: float) -> str | None:
        """Why the open round should close now: 'all sampled', 'quorum', 'timeout', or None."""
        r = self.round
        if r is None:
            return None
        if len(r.updates) >= len(r.sampled):
            return "all sampled clients"
        if len(r.updates) >= self.quorum:
            return "quorum"
        if r.opened_at is not None and now - r.opened_at >= self.round_timeout and r.updates:
            return "timeout"
        return None

    def deadline(self) -> float | None:
        r = self.round
        if r is None or r.opened_at is None:
            return None
        return r.opened_at + self.round_timeout

    def close(self) -> Round:
        """Close the open round (it has at least one update) and return it."""
        r = self.round
        assert r is not None and r.updates
        for number in r.sampled:
            lease = self.leases.pop(f"r{r.number}.c{number}", None)
            if lease is not None:
                for w in self.workers.values():
                    if w.task == f"r{r.number}.c{number}":
                        w.task = None
        self.round = None
        self.rounds_done += 1
        return r

    @property
    def training_done(self) -> bool:
        return self.rounds_done >= self.rounds

    def _training(self, worker: Worker, version: int, now: float, uid: str) -> Offer:
        r = self.open_round(version)
        if r is None:
            return Offer(None, finished=not self.evals, reason="evaluating the last version")
        for number in r.sampled:
            task_id = f"r{r.number}.c{number}"
            if number in r.updates or task_id in self.leases:
                continue
            client = self.clients[number]
            if r.opened_at is None:
                r.opened_at = now
            extra: dict[str, Any] = {"round": r.number}
            if client.slices is not None:
                count = len(client.slice_numbers)
                extra["slice"] = client.slices[0] + (r.number - 1) % count
                extra["slices"] = f"{client.slices[0]}-{client.slices[1]}"
                extra["samples"] = client.samples // count
            return Offer(self._train_task(task_id, client, worker, now, r.base_version, **extra))
        return Offer(None, reason=f"waiting for round {r.number} to close")

    def status(self) -> dict[str, Any]:
        out = super().status()
        r = self.round
        deadline = self.deadline()
        now = self._clock()
        out["round"] = {
            "number": r.number if r else min(self.rounds_done + 1, self.rounds),
            "rounds_done": self.rounds_done,
            "rounds": self.rounds,
            "sampled": [f"client-{n}" for n in r.sampled] if r else [],
            "pending": len(r.updates) if r else 0,
            "quorum": min(self.quorum, len(r.sampled)) if r else self.quorum,
            "clients": [f"client-{n}" for n in r.updates] if r else [],
            "closes_in": None if deadline is None else round(max(0.0, deadline - now), 3),
            "finished": self.finished,
        }
        return out

    def state_dict(self) -> dict[str, Any]:
        # The open round's updates are not saved: workers push them again with the same task id.
        return {"rounds_done": self.rounds_done}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        done = state.get("rounds_done", 0)
        if not isinstance(done, int) or done < 0:
            raise ValueError(f"bad rounds_done: {done!r}")
        self.rounds_done = min(done, self.rounds)
