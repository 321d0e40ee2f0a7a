"""The queue's plans: which task a worker gets next, and when a task's result counts.

A worker asks for work and gets a task with a lease (leases.py); evaluations go
first. The plan is the subclass's:

- `SliceQueue`, PARTITION=slices under an asynchronous rule: each client trains
  its slices in order, one task at a time, and keeps the worker that took it
  (affinity), so with as many workers as ranges every worker trains one client
  for the whole run, like the original.
- `SampledQueue`, other partitions under an asynchronous rule: the clients of
  updates (b-1)*C+1 .. b*C are round b's sample, so asynchronous runs train the
  same clients as round rules; the run ends after ROUNDS x C updates.
- `RoundQueue` (rounds.py), round rules: C sampled clients per round.

The queue holds no weights: the state applies or buffers updates. Its progress
is saved in checkpoints (`state_dict`), so a restart resumes it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fedsim.aggregator.strategies import Refused
from fedsim.aggregator.tasks import ids
from fedsim.aggregator.tasks.clock import RealClock, VirtualClock
from fedsim.aggregator.tasks.ids import Client
from fedsim.aggregator.tasks.leases import Leases, Worker
from fedsim.aggregator.tasks.roster import by_number
from fedsim.protocol import Attack, EvalTask, Offer, Profile, TrainSettings, TrainTask


class Queue(Leases):
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
        training: TrainSettings | Mapping[str, Any],
        partition: Mapping[str, Any],
        clock: Callable[[], float],
        wall: Callable[[], float],
        attack: Mapping[str, Any] | None = None,
        attackers: Sequence[int] = (),
        key: bytes | None = None,
        profiles: Mapping[str, Profile] | None = None,
        run_clock: RealClock | VirtualClock | None = None,
    ) -> None:
        super().__init__(task_timeout=task_timeout, clock=clock, wall=wall, key=key)
        # The run's clock (clock.py): round openings, arrivals, deadlines and availability
        # are on it; leases and workers stay on the real `clock`.
        self.run_clock = run_clock if run_clock is not None else RealClock(clock)
        self.profiles = profiles or {}  # by client id; none: everyone equal (clients.json)
        self.clients: Mapping[int, Client] = by_number(clients)  # a roster's: made when asked
        self.attack = dict(attack) if attack else None  # {"kind", "scale"}, for the attackers
        self.attackers = frozenset(attackers)
        self.seed, self.per_round, self.rounds = seed, per_round, rounds
        self.training = TrainSettings.of(training)  # epochs, batch size, learning rate, ...
        self.partition = dict(partition)
        self.evals: list[int] = []  # versions waiting to be scored, oldest first

    # --- asking -----------------------------------------------------------------------

    def ask(self, uid: str, version: int, retries: int = 0) -> tuple[Offer, Worker]:
        """A task for worker `uid` (an evaluation first), or why there is none."""
        now = self._clock()
        worker = self.worker(uid, now)
        worker.retries = max(worker.retries, retries)
        self._expire(now)
        for v in self.evals:
            task_id = ids.eval_task(v)
            if task_id not in self.leases:
                lease = self._lease(task_id, worker, now)
                worker.client = None
                return Offer(EvalTask(task_id, lease, v, worker.name, self.task_timeout)), worker
        return self._training(worker, version, now, uid), worker

    def _train_task(
        self,
        task_id: str,
        client: Client,
        worker: Worker,
        now: float,
        version: int,
        *,
        round_no: int | None = None,
        slice_no: int | None = None,
    ) -> TrainTask:
        """`task_id` leased to `worker`; with `slice_no`, only that slice of the client's range."""
        worker.client = client.id
        worker.trained += 1
        seed = ids.task_seed(self.seed, task_id)
        attack = None
        if self.attack is not None and client.number in self.attackers:
            attack = Attack(self.attack["kind"], self.attack["scale"], seed)
        samples = client.samples
        if slice_no is not None:
            samples //= len(client.slice_numbers)
        return TrainTask(
            id=task_id,
            lease=self._lease(task_id, worker, now),
            client=client.id,
            samples=samples,
            sha256=client.sha256,
            base_version=version,
            seed=seed,
            train=self.training,
            partition=self.partition,
            round=round_no,
            slice=slice_no,
            slices=None if slice_no is None else client.range_text,
            attack=attack,
            worker=worker.name,
            timeout=self.task_timeout,
            profile=self.profiles.get(client.id),
            attempt=self.attempts.get(task_id) or None,
            run=self.run,
        )

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

        Raises Refused for a task not in this run, a lease never handed out with the
        task or reassigned since, a closed round or a finished run, and for more
        samples than the task holds. A done task's result is a repeat (False) only
        under a lease handed out with it.
        """
        self._expire(self._clock())
        client = self._client_of(task_id)
        if client is None:
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
        self.check_genuine(task_id, lease)
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
        version = ids.parse_eval(task_id)
        if version is None:
            raise Refused("unknown_task", f"task {task_id} is not an evaluation task")
        self.check_genuine(task_id, lease)
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
            if ids.eval_task(version) not in self.leases:
                self.evals.remove(version)
                dropped.append(version)
        return dropped

    @property
    def finished(self) -> bool:
        return self.training_done and not self.evals

    def _finished_offer(self) -> Offer:
        """No training left: finished once the last versions are scored."""
        return Offer(None, finished=not self.evals, reason="evaluating the last version")

    # --- per plan ----------------------------------------------------------------------

    @property
    def training_done(self) -> bool:
        raise NotImplementedError

    def _client_of(self, task_id: str) -> Client | None:
        """The client of `task_id` if it is a training task of this run's plan, else None."""
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
        return {
            "workers": self.workers_status(),
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
        parsed = ids.parse_slice(task_id)
        if parsed is None:
            return None
        client = self.clients.get(parsed[0])
        if client is None or parsed[1] not in client.slice_numbers:
            return None
        return client

    def _position(self, task_id: str) -> tuple[Client, int]:
        """The client of a task of this run and the task's place in its range (0-based)."""
        client = self._client_of(task_id)
        assert client is not None and client.slices is not None
        return client, ids.parse_slice(task_id)[1] - client.slices[0]  # type: ignore[index]

    def _is_done(self, task_id: str) -> bool:
        client, position = self._position(task_id)
        return position < self.done[client.number]

    def _check_open(self, task_id: str, base_version: int, version: int) -> None:
        client, position = self._position(task_id)
        if position != self.done[client.number]:
            raise Refused(
                "out_of_order",
                f"{client.id} trains its slices in order: slice {self._next_slice(client)} "
                "comes next",
            )

    def _mark_done(self, task_id: str) -> None:
        client, position = self._position(task_id)
        self.done[client.number] = max(self.done[client.number], position + 1)

    @property
    def training_done(self) -> bool:
        return all(self.done[n] == len(c.slice_numbers) for n, c in self.clients.items())

    def _next_slice(self, client: Client) -> int:
        assert client.slices is not None
        return client.slices[0] + self.done[client.number]

    def _training(self, worker: Worker, version: int, now: float, uid: str) -> Offer:
        live = {w.name for w in self.workers.values() if now - w.last_seen < self.task_timeout}
        waiting = [
            c
            for n, c in self.clients.items()
            if self.done[n] < len(c.slice_numbers)
            and ids.slice_task(n, self._next_slice(c)) not in self.leases
        ]
        mine = [c for c in waiting if self.owner.get(c.number) == worker.name]
        free = [c for c in waiting if self.owner.get(c.number) not in live]
        pick = (mine or free or [None])[0]
        if pick is None:
            if self.training_done:
                return self._finished_offer()
            if self._surplus(worker, uid):
                return Offer(
                    None,
                    surplus=True,
                    reason=f"all {len(self.clients)} logical clients are trained by other workers",
                )
            return Offer(None, reason="waiting for the next slice")
        self.owner[pick.number] = worker.name
        slice_no = self._next_slice(pick)
        task_id = ids.slice_task(pick.number, slice_no)
        return Offer(self._train_task(task_id, pick, worker, now, version, slice_no=slice_no))

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
        self._samples: dict[int, list[int]] = {}  # the last block's sample, cached

    def client_number(self, n: int) -> int:
        """The client of update n: update n is in block b = (n-1) // C + 1, round b's sample."""
        block = (n - 1) // self.per_round + 1
        if block not in self._samples:
            self._samples = {block: ids.sample(self.seed, block, self.per_round, len(self.clients))}
        return self._samples[block][(n - 1) % self.per_round]

    def _client_of(self, task_id: str) -> Client | None:
        parsed = ids.parse_update(task_id)
        if parsed is None:
            return None
        n, number = parsed
        if not 1 <= n <= self.total or number != self.client_number(n):
            return None
        return self.clients[number]

    def _is_done(self, task_id: str) -> bool:
        return ids.parse_update(task_id)[0] in self.done_numbers  # type: ignore[index]

    def _mark_done(self, task_id: str) -> None:
        self.done_numbers.add(ids.parse_update(task_id)[0])  # type: ignore[index]

    @property
    def training_done(self) -> bool:
        return len(self.done_numbers) >= self.total

    def _training(self, worker: Worker, version: int, now: float, uid: str) -> Offer:
        for n in range(1, self.total + 1):
            if n in self.done_numbers:
                continue
            number = self.client_number(n)
            task_id = ids.update_task(n, number)
            if task_id in self.leases:
                continue
            return Offer(self._train_task(task_id, self.clients[number], worker, now, version))
        if self.training_done:
            return self._finished_offer()
        return Offer(None, reason="the remaining updates are being trained")

    def state_dict(self) -> dict[str, Any]:
        return {"updates_done": ids.ranges(sorted(self.done_numbers))}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.done_numbers = ids.unranges(str(state.get("updates_done", "")), self.total)
