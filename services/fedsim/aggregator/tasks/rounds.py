"""Round rules' plan: C clients per round, over-selected; a round closes at its first C
arrivals, or at its deadline with a quorum, or is tried again with a new sample.

Round r asks K = ceil(OVERSELECT x C) clients, drawn by a generator seeded by
(SEED, r) from the clients online when it opens (all of them without a
population): the same clients whatever the number of workers or restarts. Its
tasks are `r<r>.c<client>`, all on the version the round opened at. Under
PARTITION=slices a client trains slice number (r - 1) mod (its slice count) of
its range in round r.

The round closes at its first C arrivals (the other K - C tasks are cancelled:
their leases are revoked and their results refused with 409), or when every
client it asked has answered. With ROUND_DEADLINE (seconds on the run's clock,
or `auto`: deadlines.py), a round still open that long after it opened closes
with what arrived when that is at least MIN_CLIENTS updates; with fewer it is
never published but tried again: attempt a + 1 draws a new sample seeded by
(SEED, r, a + 1), with task ids `r<r>a<a+1>.c<client>`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedsim.aggregator.strategies import Refused
from fedsim.aggregator.tasks import deadlines, ids
from fedsim.aggregator.tasks.ids import Client
from fedsim.aggregator.tasks.leases import Worker
from fedsim.aggregator.tasks.queues import Queue
from fedsim.protocol import Offer, client_id

MAX_CLOSED = 50  # closed rounds and attempts whose late results are refused with their reason
RETRY = "retry"  # `due`'s answer when the open attempt failed and the round is tried again


@dataclass
class Round:
    number: int
    sampled: list[int]
    base_version: int
    attempt: int = 1
    opened_at: float | None = None  # when it opened, on the run's clock (its first task)
    updates: dict[int, Any] = field(default_factory=dict)  # client number -> the update
    arrivals: list[float] = field(default_factory=list)  # seconds from opened_at, in order
    held: set[int] = field(default_factory=set)  # CLOCK=virtual: arrived, waiting their turn

    def task(self, number: int) -> str:
        return ids.round_task(self.number, number, self.attempt)


class RoundQueue(Queue):
    """Round rules: K over-selected clients per round, closed at the first C arrivals, at the
    deadline with a quorum, or tried again; see the module docstring."""

    kind = "rounds"

    def __init__(
        self,
        clients: Sequence[Client],
        *,
        quorum: int,
        deadline: float | str | None = None,
        overselect: float = 1.0,
        online: Callable[[int, float], bool] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(clients, **kw)
        # quorum: the fewest updates a round is ever published with (MIN_CLIENTS, else C).
        self.quorum, self.deadline_setting = max(1, quorum), deadline
        # K: ceil(OVERSELECT x C); round() first: 1.1 x 10 is 11.000000000000002 in floats.
        self.asked = min(len(self.clients), math.ceil(round(overselect * self.per_round, 9)))
        self.online = online  # (client number, time on the run's clock) -> online then?
        self.rounds_done = 0
        self.round: Round | None = None
        self.recent: list[list[float]] = []  # arrivals of the last rounds, for `auto`
        self.closed: dict[str, str] = {}  # "7" or "7a2" -> how it ended, for late results
        self._resume: dict[str, Any] = {}  # the open round as a checkpoint saved it

    # --- opening, sampling -------------------------------------------------------------

    def open_round(self, version: int, now: float | None = None) -> Round | None:
        """The open round, opening the next one at `version` when none is open (`now`, on
        the run's clock, decides who is online; default: the run clock's now). None when the
        rounds are done or the run stopped."""
        if self.stopped is not None:
            return None
        if self.round is None and self.rounds_done < self.rounds:
            number = self.rounds_done + 1
            saved, self._resume = self._resume, {}
            if saved.get("round") == number:  # resumed mid-round: the same attempt and sample
                self.round = Round(number, list(saved["sampled"]), version, saved["attempt"])
                self.round.opened_at = saved.get("opened_at")  # on the run's clock
            else:
                self.round = Round(number, self._sample(number, 1, now), version)
        return self.round

    def _sample(self, number: int, attempt: int, now: float | None) -> list[int]:
        """Attempt `attempt` of round `number`: K clients drawn from those online `now`."""
        online = None
        if self.online is not None:
            t = self.run_clock() if now is None else now
            online = [n for n in sorted(self.clients) if self.online(n, t)]
        return ids.sample(self.seed, number, self.asked, len(self.clients), attempt, online)

    @property
    def target(self) -> int:
        """Arrivals that close the open round: C, or all it asked when fewer are online."""
        r = self.round
        return self.per_round if r is None else min(self.per_round, len(r.sampled))

    # --- results ---------------------------------------------------------------------

    def _client_of(self, task_id: str) -> Client | None:
        parsed = ids.parse_attempt(task_id)
        if parsed is None or not 1 <= parsed[0] <= self.rounds:
            return None
        round_no, attempt, number = parsed
        r = self.round
        if r is not None and (round_no, attempt) == (r.number, r.attempt):
            return self.clients[number] if number in r.sampled else None
        # Another round or attempt: refused as closed or stale by _check_open, once the
        # lease shows it was handed out (its sample may have hung on who was online).
        return self.clients.get(number)

    def _is_done(self, task_id: str) -> bool:
        round_no, attempt, number = ids.parse_attempt(task_id)  # type: ignore[misc]
        r = self.round
        # A closed round's missing update is refused as closed, not a duplicate; whether
        # a closed round's update made it in, the state's applied ids know.
        if r is None or (round_no, attempt) != (r.number, r.attempt):
            return False
        return number in r.updates or number in r.held

    def _check_open(self, task_id: str, base_version: int, version: int) -> None:
        if self.rounds_done >= self.rounds:
            raise Refused("finished", f"the run finished after {self.rounds} rounds", finished=True)
        round_no, attempt, _ = ids.parse_attempt(task_id)  # type: ignore[misc]
        current = self.open_round(version)
        assert current is not None
        if (round_no, attempt) < (current.number, current.attempt):
            key = _key(round_no, attempt)
            why = self.closed.get(key, f"round {round_no} closed")
            raise Refused("round_closed", f"{why}; the result of task {task_id} is not counted")
        if (round_no, attempt) != (current.number, current.attempt) or (
            base_version != current.base_version
        ):
            raise Refused(
                "stale",
                f"task {task_id} is for round {round_no} on version {base_version}; round "
                f"{current.number} collects updates to version {current.base_version}",
            )

    def _mark_done(self, task_id: str) -> None:
        pass  # the state puts the update into the round (add_update)

    def add_update(self, task_id: str, update: Any, now: float | None = None) -> None:
        """`update` of `task_id` arrives at `now` on the run's clock (default: its now)."""
        now = self.run_clock() if now is None else now
        _, _, number = ids.parse_attempt(task_id)  # type: ignore[misc]
        r = self.round
        assert r is not None
        if r.opened_at is None:
            r.opened_at = now
        r.updates[number] = update
        r.held.discard(number)
        r.arrivals.append(max(0.0, now - r.opened_at))

    def hold(self, task_id: str) -> None:
        """CLOCK=virtual: `task_id`'s update arrived and waits for its simulated turn
        (tasks/clock.py); it is not handed out again, and a repeat of it is a duplicate."""
        _, _, number = ids.parse_attempt(task_id)  # type: ignore[misc]
        assert self.round is not None
        self.round.held.add(number)

    # --- closing -----------------------------------------------------------------------

    def deadline_seconds(self) -> float | None:
        """How long the open attempt waits: ROUND_DEADLINE, or `auto` from recent rounds
        (doubled for each attempt after the first), or None (no deadline)."""
        setting = self.deadline_setting
        if setting is None:
            return None
        if setting != "auto":
            return float(setting)
        attempt = self.round.attempt if self.round is not None else 1
        return deadlines.auto(self.recent, self.task_timeout) * 2 ** (attempt - 1)

    def deadline(self) -> float | None:
        """When the open attempt reaches its deadline, on the run's clock; None without one."""
        r, seconds = self.round, self.deadline_seconds()
        if r is None or r.opened_at is None or seconds is None:
            return None
        return r.opened_at + seconds

    def due(self, now: float | None = None) -> str | None:
        """Why the open round should end now: 'first N arrivals', 'all sampled clients',
        'deadline' (closed with a quorum), RETRY (tried again with a new sample), or None."""
        r = self.round
        if r is None:
            return None
        now = self.run_clock() if now is None else now
        got = len(r.updates)
        if got >= self.target and got >= self.quorum:
            return "all sampled clients" if got == len(r.sampled) else f"first {got} arrivals"
        deadline = self.deadline()
        if deadline is not None and now >= deadline:
            return "deadline" if got >= self.quorum else RETRY
        if deadline is None and got == len(r.sampled):
            return RETRY  # fewer online than the quorum, and no deadline to wait for
        return None

    def close(self, why: str = "") -> Round:
        """Close the open round (it has at least one update) and return it."""
        r = self.round
        assert r is not None and r.updates
        self._revoke_all(r)
        got = len(r.updates)
        if why.startswith("first "):
            self._remember(r, f"round {r.number} closed with its first {got} arrivals")
        elif why == "deadline":
            self._remember(r, f"round {r.number} closed at its deadline with {got} arrivals")
        else:
            self._remember(r, f"round {r.number} closed with all {got} sampled clients")
        self.recent = [*self.recent, r.arrivals][-deadlines.AUTO_ROUNDS :]
        self.round = None
        self.rounds_done += 1
        return r

    def retry(self, now: float | None = None) -> Round:
        """End the open attempt without publishing it; the round opens again at `now` with a
        new sample (attempt + 1). Returns the failed attempt."""
        now = self.run_clock() if now is None else now
        r = self.round
        assert r is not None
        self._revoke_all(r)
        self._remember(
            r,
            f"round {r.number} attempt {r.attempt} reached its deadline with "
            f"{len(r.updates)} of the {self.quorum} updates it needs and was retried",
        )
        attempt = r.attempt + 1
        self.round = Round(r.number, self._sample(r.number, attempt, now), r.base_version, attempt)
        self.round.opened_at = now
        return r

    def stop(self, reason: str) -> None:
        """End training now: the open round is dropped unpublished, its late results refused."""
        r = self.round
        if r is not None:
            self._remember(r, f"round {r.number} was dropped when the run stopped")
            self.round = None
        super().stop(reason)

    def _revoke_all(self, r: Round) -> None:
        for number in r.sampled:
            self._revoke(r.task(number))

    def _remember(self, r: Round, why: str) -> None:
        self.closed[_key(r.number, r.attempt)] = why
        while len(self.closed) > MAX_CLOSED:
            self.closed.pop(next(iter(self.closed)))

    @property
    def plan_done(self) -> bool:
        return self.rounds_done >= self.rounds

    # --- handing out -----------------------------------------------------------------

    def _training(self, worker: Worker, version: int, now: float, uid: str) -> Offer:
        r = self.open_round(version)
        if r is None:
            return self._finished_offer()
        for number in r.sampled:
            task_id = r.task(number)
            if number in r.updates or number in r.held or task_id in self.leases:
                continue
            client = self.clients[number]
            if r.opened_at is None:
                r.opened_at = self.run_clock()
            slice_no = None
            if client.slices is not None:
                slice_no = client.slices[0] + (r.number - 1) % len(client.slice_numbers)
            task = self._train_task(
                task_id, client, worker, now, r.base_version, round_no=r.number, slice_no=slice_no
            )
            return Offer(task)
        return Offer(None, reason=f"waiting for round {r.number} to close")

    # --- status and checkpoints ----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        out = super().status()
        r = self.round
        deadline = self.deadline()
        now = self.run_clock()
        out["round"] = {
            "number": r.number if r else min(self.rounds_done + 1, self.rounds),
            "attempt": r.attempt if r else self._resume.get("attempt", 1),
            "rounds_done": self.rounds_done,
            "rounds": self.rounds,
            "sampled": [client_id(n) for n in r.sampled] if r else [],
            "target": self.target,
            "pending": len(r.updates) if r else 0,
            "quorum": self.quorum,
            "clients": [client_id(n) for n in r.updates] if r else [],
            "deadline_seconds": self.deadline_seconds(),
            "closes_in": None if deadline is None else round(max(0.0, deadline - now), 3),
            "finished": self.finished,
        }
        return out

    def state_dict(self) -> dict[str, Any]:
        # The open round's updates are not saved: workers push them again with the same task
        # id, which names the attempt; its sample is, as it may have hung on who was online.
        out: dict[str, Any] = {"rounds_done": self.rounds_done, "arrivals": self.recent}
        r = self.round
        if r is not None:
            out["open"] = {"round": r.number, "attempt": r.attempt, "sampled": r.sampled}
            if r.opened_at is not None:
                out["open"]["opened_at"] = r.opened_at
        elif self._resume:
            out["open"] = self._resume
        if self.closed:
            out["closed"] = dict(self.closed)
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        done = state.get("rounds_done", 0)
        if not isinstance(done, int) or done < 0:
            raise ValueError(f"bad rounds_done: {done!r}")
        self.rounds_done = min(done, self.rounds)
        arrivals = state.get("arrivals", [])
        if not isinstance(arrivals, list) or not all(
            isinstance(a, list) and all(_seconds(t) for t in a) for a in arrivals
        ):
            raise ValueError("bad arrivals: lists of seconds >= 0 expected")
        self.recent = [[float(t) for t in a] for a in arrivals][-deadlines.AUTO_ROUNDS :]
        closed = state.get("closed", {})
        if not isinstance(closed, dict) or not all(isinstance(v, str) for v in closed.values()):
            raise ValueError("bad closed rounds: a mapping of reasons expected")
        self.closed = {str(k): v for k, v in closed.items()}
        self._resume = _open(state.get("open"), self.rounds_done + 1, len(self.clients))


def _key(round_no: int, attempt: int) -> str:
    return str(round_no) if attempt == 1 else f"{round_no}a{attempt}"


def _seconds(t: Any) -> bool:
    return isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t) and t >= 0


def _open(saved: Any, number: int, clients: int) -> dict[str, Any]:
    """The open round a checkpoint saved, checked; {} when none or of another round."""
    if saved is None:
        return {}
    if not isinstance(saved, dict):
        raise ValueError(f"bad open round: {saved!r}")
    attempt, sampled = saved.get("attempt"), saved.get("sampled")
    if not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"bad open round attempt: {attempt!r}")
    if not isinstance(sampled, list) or not all(
        isinstance(n, int) and 1 <= n <= clients for n in sampled
    ):
        raise ValueError(f"bad open round sample: {sampled!r}")
    opened_at = saved.get("opened_at")
    if opened_at is not None and not _seconds(opened_at):
        raise ValueError(f"bad open round time: {opened_at!r}")
    if saved.get("round") != number:
        return {}
    out = {"round": number, "attempt": attempt, "sampled": sorted(set(sampled))}
    return out if opened_at is None else {**out, "opened_at": float(opened_at)}
