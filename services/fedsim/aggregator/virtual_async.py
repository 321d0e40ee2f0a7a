"""CLOCK=virtual for asynchronous rules (async-weighted, fedasync, fedbuff) in the aggregator.

tasks/flights.py holds the plan: C clients in flight on the simulated clock, each
starting from the version current at its simulated start. Here the state runs
it: a worker's update is held until no earlier finish can still appear (the
conservative order of tasks/clock.py), then the rule takes it through the same
intake as under the real clock (`intake.accept`), the freed slot starts the next
client on the version just made, and so on while events are due. The versions
the flights start from are kept in memory and served to the workers that train
them (`/v1/model?version=`). The caller holds the state's lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fedsim import checkpoints, weights
from fedsim.aggregator import intake
from fedsim.aggregator.snapshot import Snapshot
from fedsim.aggregator.strategies import Refused, Update
from fedsim.aggregator.tasks.clock import task_durations
from fedsim.aggregator.tasks.flights import BASE_TENSORS, Flight, FlightQueue
from fedsim.models import SHAPES

log = logging.getLogger("fedsim.aggregator")


class Flights:
    """The state's side of the flights: the real clock for the intake, the kept bases."""

    def __init__(self, queue: FlightQueue, now: Callable[[], float]) -> None:
        self.queue, self.now = queue, now
        self.bases: dict[int, Snapshot] = {}  # version -> the model flights start from

    def keep(self, version: int, snap: Snapshot | None) -> None:
        if snap is not None and snap.version == version:
            self.bases[version] = snap

    def prune(self) -> None:
        wanted = self.queue.bases()
        for version in [v for v in self.bases if v not in wanted]:
            del self.bases[version]


def driver(core: Any, now: Callable[[], float]) -> Flights:
    """The flights of `core` (the state, with a FlightQueue), their bases found again after
    a restart, and the first clients started."""
    queue = core.queue
    assert isinstance(queue, FlightQueue)
    queue.duration = task_durations(core.settings, core.population, queue.clients)
    sim = Flights(queue, now)
    current = core.snapshot
    kept = _kept(core) if queue.bases() - {current.version} else {}
    for version in sorted(queue.bases()):
        found = current if version == current.version else kept.get(version)
        if found is None:
            found = _saved(core, version)
        if found is not None:
            sim.keep(version, found)
            continue
        # Neither the checkpoint nor a file of its own holds the flight's base (a checkpoint
        # written before this was kept): it starts from the resumed version (its times
        # stay), so its update, and what follows, differ from an uninterrupted run.
        for f in [f for f in queue.flying.values() if f.base == version]:
            queue.rebase(f.n, current.version)
            log.warning(
                "update %d (%s) started from v%d, which no checkpoint holds now: it trains "
                "from v%d instead",
                f.n,
                f.task,
                version,
                current.version,
            )
        sim.keep(current.version, current)
    run(core, sim)
    return sim


def base(sim: Any, version: int) -> Snapshot | None:
    """The model a flight starts from, when `sim` is the flights and keeps `version`."""
    return sim.bases.get(version) if isinstance(sim, Flights) else None


def arrive(core: Any, sim: Flights, update: Update) -> None:
    """An update arrived (real time): it waits for its simulated turn, then every event due
    is taken in simulated order. Raises Refused when its task is not in flight."""
    queue, task = sim.queue, update.task_id
    if task is None:
        raise Refused(
            "no_task",
            "CLOCK=virtual takes only updates for tasks, in simulated order: start a worker "
            "instead of a client with its own range",
        )
    run(core, sim)
    if task not in queue.clock.outstanding:
        raise Refused("unknown_task", f"task {task} is not in flight in simulated time")
    queue.record_update(task, update.lease)  # its lease ends: the update is in
    queue.clock.arrive(task, update)
    run(core, sim)


def run(core: Any, sim: Flights) -> None:
    """Start the clients due and take every finish due, in simulated order."""
    queue = sim.queue
    while True:
        for flight in queue.start(core.snapshot.version):
            sim.keep(flight.base, core.snapshot)
            _log_start(queue, flight)
        event = queue.clock.next(queue.start_at())
        if event is None:
            return
        if event.timer:  # a client comes online: the loop starts it
            continue
        land(core, sim, event.task, event.item)


def land(core: Any, sim: Flights, task: str, update: Update) -> None:
    """`update` finishes now in simulated time: the rule takes it, its slot is free."""
    flight = sim.queue.land(task)
    before = core.snapshot.version
    try:
        intake.accept(core, update, core.snapshot.version, sim.now())
    except Refused as exc:  # its task is spent all the same (intake.accept): the run goes on
        log.error("update %s of %s refused by the rule: %s", task, update.client_id, exc.reason)
        core.events.add("refused", f"{update.client_id}: {exc.code}: {exc.reason}")
    log.info(
        "update %d (%s, %s) finished at %.3f s simulated: base v%d, staleness %d",
        flight.n,
        task,
        update.client_id,
        sim.queue.clock.now,
        flight.base,
        before - flight.base,  # the versions made since it started
    )
    sim.prune()


def replay(core: Any, sim: Flights, update: Update, at: float, take: Callable[[], None]) -> bool:
    """A journaled update taken again after a restart (replay.py): at its simulated time, in
    its flight's place. `take()` is the intake; False when the update is of no flight."""
    queue, task = sim.queue, update.task_id
    if task is None or not any(f.task == task for f in queue.flying.values()):
        return False
    queue.clock.cancel(task)  # taken now, not awaited
    queue.clock.now = max(queue.clock.now, at)
    queue.land(task)
    take()
    sim.prune()
    run(core, sim)
    return True


def _kept(core: Any) -> dict[int, Snapshot]:
    """The flights' bases the checkpoint resumed from holds beside the model."""
    s = core.settings
    try:
        ckpt = checkpoints.read(checkpoints.path_for(s.model_dir, core.snapshot.version))
    except (OSError, weights.WeightsError):
        return {}
    by_version: dict[int, dict[str, Any]] = {}
    for key, tensor in checkpoints.split(ckpt.tensors)[1].items():
        if key.startswith(BASE_TENSORS):
            version, _, name = key.removeprefix(BASE_TENSORS).partition("/")
            if version.isdigit() and name:
                by_version.setdefault(int(version), {})[name] = tensor
    return {
        v: Snapshot.of(t, v, 0, s.model, s.compression_down)
        for v, t in by_version.items()
        if set(t) == {name for name, _ in SHAPES[s.model]}
    }


def _saved(core: Any, version: int) -> Snapshot | None:
    """`version` from its checkpoint file, or None."""
    s = core.settings
    try:
        ckpt = checkpoints.read(checkpoints.path_for(s.model_dir, version))
    except (OSError, weights.WeightsError):
        return None
    model = checkpoints.split(ckpt.tensors)[0]
    samples = int(ckpt.metadata.get("samples", "0"))
    return Snapshot.of(model, version, samples, s.model, s.compression_down)


def _log_start(queue: FlightQueue, flight: Flight) -> None:
    finish = queue.clock.finish_of(flight.task)
    log.info(
        "update %d (%s) starts at %.3f s simulated on v%d, finishes at %.3f s",
        flight.n,
        flight.task,
        flight.start,
        flight.base,
        finish if finish is not None else flight.start,
    )
