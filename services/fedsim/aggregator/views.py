"""What the aggregator shows of itself: status, summary, update lookup, client records.

`Clients` and the rows of `applied` updates are records kept for /v1/status;
`status`, `summary` and `lookup` read the state's core (see `Core`) and return
plain copies, so their JSON is made after the lock is released. The caller holds
the state's lock.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from typing import Any, Protocol

from fedsim.aggregator import privacy, tasks
from fedsim.aggregator.evaluations import Evaluations
from fedsim.aggregator.events import Events
from fedsim.aggregator.ledger import Ledger
from fedsim.aggregator.snapshot import Snapshot
from fedsim.aggregator.strategies import Strategy, Update
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
    """The logical clients of the plan, and the newest MAX_CLIENTS_SHOWN hand-started ones."""

    def __init__(
        self,
        manifest: dict[str, Any],
        clients: list[tasks.Client],
        attackers: list[str],
        people: Population | None = None,
    ) -> None:
        profile = {c.id: c for c in people.clients} if people is not None else {}
        self._planned = {
            c.id: {
                "id": c.id,
                "samples": c.samples,
                "labels": manifest["clients"][i].get("labels"),
                "slices": f"{c.slices[0]}-{c.slices[1]}" if c.slices else None,
                "updates": 0,
                "last_seen": None,
                "staleness": None,
                "loss": None,
                "accuracy": None,
                "attacker": c.id in attackers,
                **_profile(profile.get(c.id)),
                "dropouts": 0,  # tasks given back (DROPOUT_MODE=abort)
            }
            for i, c in enumerate(clients)
        }
        self._others: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._planned)

    def see(self, update: Update, staleness: int, stamp: str) -> None:
        """Note an accepted update of its client at `stamp`, `staleness` versions behind."""
        record = self._planned.get(update.client_id)
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
        record = self._planned.get(client or "")
        if record is not None:
            record["dropouts"] += 1

    def rows(self) -> list[dict[str, Any]]:
        return [dict(c) for c in self._planned.values()] + [dict(c) for c in self._others.values()]


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


def shown_clients(rows: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """At most `limit` of the client rows (None: all): the most recently seen, in their
    order (the plan's, then hand-started ones)."""
    if limit is None or len(rows) <= limit:
        return rows
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["last_seen"] or "", -i), reverse=True)
    return [rows[i] for i in sorted(order[:limit])]


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
        "clients": shown_clients(rows := core.clients.rows(), clients),
        "clients_total": len(rows),
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
