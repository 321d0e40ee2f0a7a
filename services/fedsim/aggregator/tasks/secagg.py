"""SECAGG=true's plan: each round is secure aggregation's four phases, as tasks with leases.

Round r samples C clients as `RoundQueue` does and opens an attempt (a fresh random
nonce, from which the workers derive the attempt's keys and masks; pipeline/secagg):

1. keys    `r<r>.c<n>.keys`: advertise (c_pk, s_pk); closes with U1.
2. shares  `r<r>.c<n>.shares`: encrypted Shamir shares to every client of U1; U2.
3. masked  `r<r>.c<n>`: the training task, carrying U2's public keys; the worker pushes
           the masked input. A lease that runs out is NOT handed out again: that client
           dropped (a second masked input of one client would need new masks); U3.
4. unmask  `r<r>.c<n>.unmask`: U3's shares of b and U2 \\ U3's shares of s_sk; U4.

A phase closes when every client it waits for is in, or TASK_TIMEOUT after it opened
(phase 3, which trains: ROUND_DEADLINE seconds when set). A phase task whose lease runs out goes to
another worker (any worker can act for any client). Below SECAGG_THRESHOLD the attempt
is abandoned, logged, and the round tried again with a new sample and a new nonce:
nothing of it is published. The attempt is never saved: after a restart the round
starts again with a new nonce (`state_dict` is RoundQueue's, rounds done only).
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedsim.aggregator.strategies import Refused
from fedsim.aggregator.tasks import ids
from fedsim.aggregator.tasks.ids import Client
from fedsim.aggregator.tasks.leases import Worker
from fedsim.aggregator.tasks.rounds import Round, RoundQueue
from fedsim.pipeline.secagg import server
from fedsim.protocol import Masking, Offer, SecaggTask, client_id
from fedsim.protocol.secagg import blobs_json, keys_json

HISTORY = 50  # rounds whose protocol costs /v1/status shows
PHASE_TASKS = {"keys": "keys", "shares": "shares", "unmask": "unmask"}  # phase -> id suffix


def phase_task(round_no: int, client: int, phase: str) -> str:
    """A phase task's id: `r3.c17.keys`; phase 3's is the training task `r3.c17`."""
    return f"{ids.round_task(round_no, client)}.{phase}"


def parse_phase_task(task_id: str) -> tuple[int, int, str] | None:
    """(round, client, phase) of a phase task's id, else None."""
    head, _, phase = task_id.rpartition(".")
    parsed = ids.parse_round(head)
    if parsed is None or phase not in PHASE_TASKS:
        return None
    return parsed[0], parsed[1], phase


@dataclass
class Stats:
    """The open round's protocol costs, shown per round (never anything of one update)."""

    started: float  # when its first attempt opened
    attempts: int = 0
    bytes: int = 0  # received and sent in phase messages and masked inputs
    masked_in: int = 0
    recovered: int = 0  # dropouts whose masks were rebuilt
    unmask_seconds: float = 0.0  # wall time of the unmasking: the sum less the rebuilt masks


@dataclass
class Outcome:
    """A round unmasked: the survivors' weighted mean delta (flat, sorted tensor names)."""

    round: Round
    mean: np.ndarray
    survivors: tuple[int, ...]
    weights: Mapping[int, int]
    stats: Stats


class SecaggQueue(RoundQueue):
    """Round rules under SECAGG=true: one attempt of the four phases at a time."""

    kind = "secagg"

    def __init__(
        self,
        clients: Sequence[Client],
        *,
        threshold: int,
        size: int,
        equal_weights: bool = False,
        **kw: Any,
    ) -> None:
        super().__init__(clients, **kw)
        self.threshold, self.size = threshold, size
        self.equal_weights = equal_weights  # DP: an equal-weight mean (pipeline/dp.py)
        self.attempt: server.Attempt | None = None
        self.phase_opened: float | None = None  # when the open phase's first task went out
        self.offered: set[int] = set()  # phase 3: clients given their training task
        self.stats: Stats | None = None
        self.outcome: Outcome | None = None
        self.abandoned: list[str] = []  # reasons of attempts abandoned, drained by the state
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)  # rounds' protocol costs

    # --- attempts ---------------------------------------------------------------------

    def open_round(self, version: int) -> Round | None:
        r = super().open_round(version)
        if r is not None and self.attempt is None and self.outcome is None:
            self._new_attempt(r)
        return r

    def stop(self, reason: str) -> None:
        """End training now: the open attempt is dropped with its round, nothing unmasked."""
        self.attempt, self.outcome, self.stats, self.phase_opened = None, None, None, None
        self.offered = set()
        super().stop(reason)

    def _new_attempt(self, r: Round) -> None:
        now = self._clock()
        if self.stats is None:
            self.stats = Stats(started=now)
        self.stats.attempts += 1
        if self.stats.attempts > 1:  # a new sample: the same clients may drop again
            rng = np.random.default_rng([self.seed, r.number, self.stats.attempts])
            picked = rng.choice(len(self.clients), size=self.per_round, replace=False)
            r.sampled = sorted(int(i) + 1 for i in picked)
        weights = {n: 1 if self.equal_weights else self._samples(self.clients[n])
                   for n in r.sampled}  # fmt: skip
        self.attempt = server.Attempt(
            r.number, secrets.token_bytes(16), r.sampled, weights, self.threshold, self.size
        )
        self.phase_opened, self.offered = None, set()

    def _samples(self, client: Client) -> int:
        return client.samples // len(client.slice_numbers) if client.slices else client.samples

    def advance(self, now: float) -> str | None:
        """Close the open phase when it is complete or timed out; what happened, or None."""
        a, r = self.attempt, self.round
        if a is None or r is None or self.phase_opened is None:
            return None
        timeout = self._timeout(a.phase)
        if not self._complete(a) and now - self.phase_opened < timeout:
            return None
        closed = a.phase
        self._revoke_phase(a)
        try:
            if closed == "keys":
                a.close_keys()
            elif closed == "shares":
                a.close_shares()
            elif closed == "masked":
                a.close_masked()
            else:
                unmasking = time.perf_counter()
                mean, _ = a.close_unmask()
                assert self.stats is not None
                self.stats.unmask_seconds = time.perf_counter() - unmasking
                self.stats.masked_in, self.stats.recovered = len(a.u3), len(a.dropped)
                self.outcome = Outcome(r, mean, a.u3, dict(a.weights), self.stats)
                self.attempt = None
                return "unmasked"
        except server.Abandoned as exc:
            self.abandoned.append(exc.reason)
            self._new_attempt(r)
            return "abandoned"
        self.phase_opened = now
        return f"phase {closed} closed"

    def _complete(self, a: server.Attempt) -> bool:
        if a.phase != "masked":
            return a.complete()
        # A client whose training lease ran out dropped: it is not waited for.
        return all(
            n in a.masked
            or (n in self.offered and ids.round_task(a.round_no, n) not in self.leases)
            for n in a.u2
        )

    def _revoke_phase(self, a: server.Attempt) -> None:
        for n in a.expected():
            self._revoke(self._task_id(a, n))

    def _task_id(self, a: server.Attempt, n: int) -> str:
        if a.phase == "masked":
            return ids.round_task(a.round_no, n)
        return phase_task(a.round_no, n, a.phase)

    # --- round closing (the state takes the outcome: aggregator/secure.py) --------------

    def due(self, now: float) -> str | None:
        return "unmasked" if self.outcome is not None else None

    def deadline(self) -> float | None:
        a = self.attempt
        if a is None or self.phase_opened is None:
            return None
        return self.phase_opened + self._timeout(a.phase)

    def _timeout(self, phase: str) -> float:
        """Seconds a phase stays open: TASK_TIMEOUT, or for training ROUND_DEADLINE's."""
        deadline = self.deadline_setting
        if phase == "masked" and isinstance(deadline, int | float):
            return float(deadline)
        return self.task_timeout

    def take_outcome(self) -> Outcome:
        """The unmasked round; the round is closed (the next opens on the next request)."""
        outcome = self.outcome
        assert outcome is not None and self.round is outcome.round
        self.outcome, self.stats, self.round = None, None, None
        self.rounds_done += 1
        return outcome

    # --- handing out -------------------------------------------------------------------

    def _training(self, worker: Worker, version: int, now: float, uid: str) -> Offer:
        r = self.open_round(version)
        if r is None:
            return self._finished_offer()
        a = self.attempt
        if a is None:
            return Offer(None, reason=f"round {r.number} is being aggregated")
        for n in a.expected():
            task_id = self._task_id(a, n)
            if n in a.received() or task_id in self.leases:
                continue
            if a.phase == "masked" and n in self.offered:
                continue  # its lease ran out: it dropped
            if self.phase_opened is None:
                self.phase_opened = now
            if a.phase == "masked":
                self.offered.add(n)
                task = self._train_task(task_id, self.clients[n], worker, now, r.base_version,
                                        round_no=r.number, slice_no=self._slice(r, n))  # fmt: skip
                masking = Masking(a.nonce.hex(), keys_json(a.public_keys(a.u2)), a.weights[n])
                return Offer(replace(task, secagg=masking))
            return Offer(self._phase_task(a, n, task_id, worker, now))
        return Offer(
            None, reason=f"waiting for round {r.number}'s secure aggregation phase {a.phase}"
        )

    def _slice(self, r: Round, n: int) -> int | None:
        client = self.clients[n]
        if client.slices is None:
            return None
        return client.slices[0] + (r.number - 1) % len(client.slice_numbers)

    def _phase_task(
        self, a: server.Attempt, n: int, task_id: str, worker: Worker, now: float
    ) -> SecaggTask:
        worker.client = client_id(n)
        extra: dict[str, Any] = {}
        if a.phase in ("shares", "unmask"):
            extra["keys"] = keys_json(a.public_keys(a.u1))
        if a.phase == "unmask":
            extra["received"] = blobs_json(a.shares_for(n))
            extra["survivors"] = [client_id(v) for v in a.u3]
            extra["dropped"] = [client_id(v) for v in a.dropped]
        return SecaggTask(
            task_id,
            self._lease(task_id, worker, now),
            client_id(n),
            a.round_no,
            a.phase,
            a.nonce.hex(),
            self.threshold,
            worker=worker.name,
            timeout=self.task_timeout,
            **extra,
        )

    # --- results -----------------------------------------------------------------------

    def check_update(self, task_id: str, lease: str, client_id: str, *args: Any) -> bool:
        """A plaintext update is never taken under SECAGG=true: its round wants masked inputs."""
        raise Refused(
            "masked_only",
            f"SECAGG=true: task {task_id}'s update must be masked and sent to "
            "/v1/secagg/masked; a plaintext update is not taken",
            status=422,
        )

    def check_phase(self, task_id: str, lease: str, nonce: str, phase: str) -> int:
        """The client a phase report is for, after checking it is wanted now; Refused."""
        self._expire(self._clock())
        parsed = parse_phase_task(task_id)
        if parsed is None or parsed[2] != phase:
            raise Refused("unknown_task", f"task {task_id} is not a {phase} task of this run")
        self.check_genuine(task_id, lease)
        return self._check_attempt(task_id, lease, nonce, parsed[0], parsed[1], phase)

    def check_masked(self, task_id: str, lease: str, nonce: str, client: str) -> int:
        """The client a masked input is for, after checking it is wanted now; Refused."""
        self._expire(self._clock())
        parsed = ids.parse_round(task_id)
        if parsed is None or client_id(parsed[1]) != client:
            raise Refused("unknown_task", f"task {task_id} is not {client}'s training task")
        self.check_genuine(task_id, lease)
        return self._check_attempt(task_id, lease, nonce, parsed[0], parsed[1], "masked")

    def _check_attempt(
        self, task_id: str, lease: str, nonce: str, round_no: int, n: int, phase: str
    ) -> int:
        a = self.attempt
        if a is None or round_no != a.round_no or nonce != a.nonce.hex():
            raise Refused(
                "stale",
                f"task {task_id} belongs to an attempt that is over (abandoned, or its round "
                "closed): the result is not counted",
            )
        if a.phase != phase:
            raise Refused("stale", f"phase {phase} of round {round_no} is closed")
        self._check_lease(task_id, lease)
        return n

    def done(self, task_id: str, lease: str) -> None:
        self._release(task_id, lease)

    def status(self) -> dict[str, Any]:
        out = super().status()
        a, stats = self.attempt, self.stats
        if a is not None:  # the round's progress is the open phase's: who is in of whom
            out["round"].update(pending=len(a.received()), quorum=self.threshold, clients=[])
        out["secagg"] = {
            "phase": a.phase if a else None,
            "attempt": stats.attempts if stats else 0,
            "threshold": self.threshold,
            "in": len(a.received()) if a else 0,
            "expected": len(a.expected()) if a else 0,
            "rounds": list(self.history)[-10:],
        }
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)  # rounds done; the open attempt is never saved
