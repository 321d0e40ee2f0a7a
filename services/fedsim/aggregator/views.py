"""What the aggregator shows of itself: status, summary, update lookup, client records.

`Clients` and the rows of `applied` updates are records kept for /v1/status;
`status`, `summary` and `lookup` read the state's core (see `Core`) and return
plain copies, so their JSON is made after the lock is released. The caller holds
the state's lock.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any, Protocol

from fedsim.aggregator import privacy, tasks
from fedsim.aggregator.evaluations import Evaluations
from fedsim.aggregator.events import Events
from fedsim.aggregator.ledger import Ledger
from fedsim.aggregator.snapshot import Snapshot
from fedsim.aggregator.strategies import Strategy, Update
from fedsim.aggregator.tasks.roster import Roster, number_of
from fedsim.config import Settings
from fedsim.data.population import ClientProfile, Population

HISTORY = 20  # recent aggregated updates shown by /v1/status
MAX_CLIENTS_SHOWN = 1000  # hand-started clients remembered for /v1/status
# Client rows /v1/status gives unless asked for more (?clients=N or all): a poll's size does
# not grow with a population of thousands; beyond it, the most recently seen are shown.
STATUS_CLIENTS = 500


def applied(update: Update, version: int, stamp: str) -> dict[str, Any]:
    """The row of /v1/status's `history` for an update aggregated into `version`."""
    return {
        "client_id": update.client_id,
        "update_id": update.update_id,
        "task": update.task_id,
        "slice": update.meta.get("slice"),
        "base_version": update.base_version,
        "version": version,
        "samples": update.num_samples,
        "time": stamp,
    }


class Clients:
    """The plan's logical clients and the newest MAX_CLIENTS_SHOWN hand-started ones.

    A planned client gets a record of its own only once seen (an update, a dropout); the
    row of one never seen is made from the roster and the population when shown, so the
    memory grows with the clients seen, not with the plan (10,000 clients, tasks/roster.py).
    """

    def __init__(
        self,
        clients: Sequence[tasks.Client],
        attackers: list[str],
        people: Population | None = None,
    ) -> None:
        self._roster = clients
        self._attackers = frozenset(attackers)
        self._people = people
        self._seen: dict[int, dict[str, Any]] = {}  # by client number, made on first sight
        self._others: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._roster)

    def _row(self, number: int) -> dict[str, Any]:
        """The row of planned client `number` as it is before it is seen."""
        c = self._roster[number - 1]
        labels = self._roster.label_counts(number) if isinstance(self._roster, Roster) else None
        profile = self._people.client(c.id) if self._people is not None else None
        return {
            "id": c.id,
            "samples": c.samples,
            "labels": labels,
            "slices": f"{c.slices[0]}-{c.slices[1]}" if c.slices else None,
            "updates": 0,
            "last_seen": None,
            "staleness": None,
            "loss": None,
            "accuracy": None,
            "attacker": c.id in self._attackers,
            **_profile(profile),
            "dropouts": 0,  # tasks given back (DROPOUT_MODE=abort)
        }

    def record(self, client_id: str) -> dict[str, Any] | None:
        """The record of a planned client, kept from now on; None outside the plan."""
        number = number_of(client_id, len(self._roster))
        if number is None:
            return None
        if number not in self._seen:
            self._seen[number] = self._row(number)
        return self._seen[number]

    def see(self, update: Update, staleness: int, stamp: str) -> None:
        """Note an accepted update of its client at `stamp`, `staleness` versions behind."""
        record = self.record(update.client_id)
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
        record["last_seen"] = stamp
        record["base_version"] = update.base_version
        record["staleness"] = max(0, staleness)
        for key in ("slices", "slice", "loss", "accuracy", "retries", "secagg"):
            if key in update.meta:
                record[key] = update.meta[key]

    def dropped(self, client: str | None) -> None:
        record = self.record(client or "")
        if record is not None:
            record["dropouts"] += 1

    def _copy(self, number: int) -> dict[str, Any]:
        seen = self._seen.get(number)
        return dict(seen) if seen is not None else self._row(number)

    def rows(self) -> list[dict[str, Any]]:
        """Every row: the plan's in its order, then the hand-started ones."""
        planned = [self._copy(n) for n in range(1, len(self._roster) + 1)]
        return planned + [dict(c) for c in self._others.values()]

    def shown(self, limit: int | None) -> tuple[list[dict[str, Any]], int]:
        """At most `limit` rows (None: all) and the number of rows: the most recently seen,
        ties to the first in order, then the never seen in order; listed in order (the
        plan's, then hand-started ones). Made from the clients seen and the `limit` first
        of the others, not from every row."""
        planned = len(self._roster)
        total = planned + len(self._others)
        if limit is None or total <= limit:
            return self.rows(), total
        # (last_seen, -position) of each record seen at some time; the others sort below.
        timed = [(r["last_seen"], -(n - 1)) for n, r in self._seen.items() if r["last_seen"]]
        timed += [(r["last_seen"], -(planned + i)) for i, r in enumerate(self._others.values())]
        chosen = {-pos for _, pos in heapq.nlargest(limit, timed)}
        timed_positions = {-pos for _, pos in timed}
        position = 0
        while len(chosen) < limit and position < planned:  # never seen: the plan's first
            if position not in timed_positions:
                chosen.add(position)
            position += 1
        others = list(self._others.values())
        rows = [
            self._copy(p + 1) if p < planned else dict(others[p - planned]) for p in sorted(chosen)
        ]
        return rows, total


def _profile(c: ClientProfile | None) -> dict[str, Any]:
    """A client's population line for the table: speed, bandwidth (None: unlimited), dropout."""
    if c is None:
        return {"speed": 1.0, "bandwidth": None, "dropout": 0.0}
    bandwidth = None if math.isinf(c.bandwidth) else c.bandwidth
    return {"speed": c.speed, "bandwidth": bandwidth, "dropout": c.dropout}


class Core(Protocol):
    """What the views read of the state."""

    settings: Settings
    manifest: dict[str, Any]
    strategy: Strategy
    queue: tasks.Queue
    snapshot: Snapshot
    ledger: Ledger
    evaluations: Evaluations
    clients: Clients
    events: Events
    recent: deque[dict[str, Any]]
    held: list[Update]
    privacy: privacy.Privacy | None
    population: Population | None


def status(core: Core, clients: int | None = STATUS_CLIENTS) -> dict[str, Any]:
    """GET /v1/status: the version, rule, round, run, clients (at most `clients` rows; None:
    all), workers, events, last checkpoint."""
    s, queue, snap = core.settings, core.queue, core.snapshot
    queue_status = queue.status()
    if isinstance(queue, tasks.RoundQueue) and queue.round:
        pending = len(queue.round.updates)
    else:
        pending = len(core.held)
    return {
        "version": snap.version,
        "samples": snap.samples,
        "label": s.run_label,  # RUN_LABEL: an experiment's cell and seed; "" when unset
        "model": s.model,
        "strategy": core.strategy.name,
        "mode": core.strategy.mode,
        "partition": dict(core.manifest["settings"]),
        "finished": queue.finished,
        # Why training stopped before its end (a client's training diverged); None if not.
        "stopped": queue.stopped,
        "round": queue_status.pop("round", None),
        "run": {
            "rounds": s.rounds,
            "clients_per_round": s.per_round,
            "logical_clients": len(core.clients),
            # Round rules score every round; asynchronous ones every EVAL_EVERY versions.
            "eval_every": 1 if core.strategy.mode == "rounds" else s.evaluate_every,
            "task_timeout": s.task_timeout,
        },
        "updates": core.ledger.total,
        "pending_updates": pending,
        "unsaved_updates": core.ledger.unsaved(),
        "clients": (shown := core.clients.shown(clients))[0],
        "clients_total": shown[1],
        "workers": queue_status["workers"],
        "evaluations_pending": queue_status["evaluations_pending"],
        "history": list(core.recent),
        "events": core.events.rows(),
        "last_checkpoint": dict(core.ledger.last_checkpoint),
        # Differential privacy (aggregator/privacy.py): epsilon so far; None when DP is off.
        "privacy": privacy.status_of(core),
        # The population (clients.json): its settings and the spread of speed and bandwidth.
        "population": None if core.population is None else core.population.summary(),
        # Secure aggregation (aggregator/tasks/secagg.py): phase, attempt, the last rounds'
        # clients masked in, dropouts recovered, protocol bytes and seconds; None when off.
        "secagg": queue_status.pop("secagg", None),
        # CLOCK=virtual, asynchronous rules: updates in flight, waiting their turn, applied
        "flights": queue_status.pop("flights", None),
        # The run's clock (tasks/clock.py): simulated seconds under CLOCK=virtual.
        "clock": {"kind": s.clock, "sim_seconds": round(queue.run_clock(), 3)},
    }


def summary(core: Core) -> dict[str, Any]:
    """The essentials the dashboard renders without JavaScript."""
    last = core.evaluations.last()
    return {
        "version": core.snapshot.version,
        "strategy": core.strategy.name,
        "model": core.settings.model,
        "partition": core.settings.partition,
        "last_accuracy": last["accuracy"] if last else None,
        "last_round": last["round"] if last else None,
        "finished": core.queue.finished,
    }


def lookup(core: Core, update_id: str, seq: int | None = None) -> dict[str, Any]:
    """What became of an update: `state` saved, applied, pending or unknown.

    saved: folded into a version that is in a checkpoint on disk; applied: in
    the served model, not yet checkpointed; pending: in an open round or a
    rule's buffer; unknown: never received, lost in a crash, or forgotten.

    A task's update id is its task id, and the task queue knows for every task
    of the run whether it is done, across restarts: a done task whose id is
    not in the ledger was saved before the last restart. A hand-started
    client's update carries its own id; every aggregated update gets a
    sequence number (`seq`, returned by POST /v1/updates), and the ledger
    remembers the most recent ones, numbers `first`..`total` (a checkpoint
    saves the last SAVED_IDS of them). So an unknown id asked with its `seq`
    is `forgotten` (certainly saved: drop it) when seq < first, else lost
    (push it again); this never counts an update twice, and an update lost in
    a crash reads as forgotten only once more than SAVED_IDS later updates
    have been checkpointed before its client asks.
    """
    ledger, queue = core.ledger, core.queue
    known = ledger.get(update_id)
    if known is not None:
        version, number = known
        state = "saved" if version <= ledger.saved_version else "applied"
        return {"update_id": update_id, "state": state, "version": version, "seq": number}
    if any(u.update_id == update_id for u in core.held) or (
        isinstance(queue, tasks.RoundQueue) and queue.is_done(update_id)
    ):
        return {"update_id": update_id, "state": "pending", "version": None, "seq": None}
    if queue.is_done(update_id):
        return {
            "update_id": update_id,
            "state": "saved",
            "version": ledger.saved_version,
            "seq": None,
        }
    first = ledger.first()
    return {
        "update_id": update_id,
        "state": "unknown",
        "forgotten": seq is not None and seq < first,
        "remembered_from": first,
    }
