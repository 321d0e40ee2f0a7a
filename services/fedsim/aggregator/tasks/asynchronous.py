"""The plans of asynchronous rules: which client trains next, and when the run is done.

- `SliceQueue`, PARTITION=slices: each client trains its slices in order, one
  task at a time, and keeps the worker that took it (affinity), so with as many
  workers as ranges every worker trains one client for the whole run, like the
  original.
- `SampledQueue`, other partitions: the clients of updates (b-1)*C+1 .. b*C are
  round b's sample, so asynchronous runs train the same clients as round rules;
  the run ends after ROUNDS x C updates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedsim.aggregator.strategies import Refused
from fedsim.aggregator.tasks import ids
from fedsim.aggregator.tasks.ids import Client
from fedsim.aggregator.tasks.leases import Worker
from fedsim.aggregator.tasks.queues import Queue
from fedsim.protocol import Offer


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
    def plan_done(self) -> bool:
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
    def plan_done(self) -> bool:
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
