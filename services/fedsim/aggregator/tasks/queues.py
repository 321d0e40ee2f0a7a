"""The queue: which task a worker gets next, and when a task's result counts.

A worker asks for work and gets a task with a lease (leases.py); evaluations go
first. The training plan is a subclass's:

- `SliceQueue` and `SampledQueue` (asynchronous.py), asynchronous rules: each
  client's slices in order, or ROUNDS x C updates by sampled clients;
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
        # Why training stopped before the plan's end (a client's training diverged); None
        # while it goes on. Not saved: a restart tries the plan again.
        self.stopped: str | None = None

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
        if self.stopped is not None:
            return self._finished_offer(), worker
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
        if self.stopped is not None:
            raise Refused("finished", f"the run stopped: {self.stopped}", finished=True)
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

    def stop(self, reason: str) -> None:
        """End training now, before the plan's end: no training task is handed out or counted
        from here on; the versions waiting for a score still get one."""
        self.stopped = reason
        for task_id in [t for t in self.leases if ids.parse_eval(t) is None]:
            self._revoke(task_id)

    @property
    def training_done(self) -> bool:
        return self.stopped is not None or self.plan_done

    @property
    def finished(self) -> bool:
        return self.training_done and not self.evals

    def _finished_offer(self) -> Offer:
        """No training left: finished once the last versions are scored."""
        return Offer(None, finished=not self.evals, reason="evaluating the last version")

    # --- per plan ----------------------------------------------------------------------

    @property
    def plan_done(self) -> bool:
        """Whether the plan's training is all done (training_done also counts a stop)."""
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
