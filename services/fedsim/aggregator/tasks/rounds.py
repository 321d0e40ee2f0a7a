"""Round rules' plan: C sampled clients per round; a round closes when they are in, or on time.

Round r samples C clients with a generator seeded by (SEED, r): the same clients
whatever the number of workers or restarts. Its tasks are `r<r>.c<client>`, all
on the version the round opened at. Under PARTITION=slices a client trains slice
number (r - 1) mod (its slice count) of its range in round r. The round closes
when all its sampled clients are in, at ROUND_QUORUM of them, or ROUND_TIMEOUT
after its first task went out with at least one update in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedsim.aggregator.strategies import Refused
from fedsim.aggregator.tasks import ids
from fedsim.aggregator.tasks.ids import Client
from fedsim.aggregator.tasks.leases import Worker
from fedsim.aggregator.tasks.queues import Queue
from fedsim.protocol import Offer, client_id


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
            sampled = ids.sample(self.seed, number, self.per_round, len(self.clients))
            self.round = Round(number, sampled, version)
        return self.round

    def _client_of(self, task_id: str) -> Client | None:
        parsed = ids.parse_round(task_id)
        if parsed is None or not 1 <= parsed[0] <= self.rounds:
            return None
        round_no, number = parsed
        if number not in ids.sample(self.seed, round_no, self.per_round, len(self.clients)):
            return None
        return self.clients[number]

    def _is_done(self, task_id: str) -> bool:
        round_no, number = ids.parse_round(task_id)  # type: ignore[misc]
        if round_no <= self.rounds_done:
            # A closed round's missing update is refused as stale, not a duplicate; whether
            # a closed round's update made it in, the state's applied ids know.
            return False
        return self.round is not None and number in self.round.updates

    def _check_open(self, task_id: str, base_version: int, version: int) -> None:
        if self.rounds_done >= self.rounds:
            raise Refused("finished", f"the run finished after {self.rounds} rounds", finished=True)
        round_no, _ = ids.parse_round(task_id)  # type: ignore[misc]
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
        _, number = ids.parse_round(task_id)  # type: ignore[misc]
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
            self._revoke(ids.round_task(r.number, number))
        self.round = None
        self.rounds_done += 1
        return r

    @property
    def training_done(self) -> bool:
        return self.rounds_done >= self.rounds

    def _training(self, worker: Worker, version: int, now: float, uid: str) -> Offer:
        r = self.open_round(version)
        if r is None:
            return self._finished_offer()
        for number in r.sampled:
            task_id = ids.round_task(r.number, number)
            if number in r.updates or task_id in self.leases:
                continue
            client = self.clients[number]
            if r.opened_at is None:
                r.opened_at = now
            slice_no = None
            if client.slices is not None:
                slice_no = client.slices[0] + (r.number - 1) % len(client.slice_numbers)
            task = self._train_task(
                task_id, client, worker, now, r.base_version, round_no=r.number, slice_no=slice_no
            )
            return Offer(task)
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
            "sampled": [client_id(n) for n in r.sampled] if r else [],
            "pending": len(r.updates) if r else 0,
            "quorum": min(self.quorum, len(r.sampled)) if r else self.quorum,
            "clients": [client_id(n) for n in r.updates] if r else [],
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
