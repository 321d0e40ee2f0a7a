"""CLOCK=virtual in the aggregator: updates taken in simulated-arrival order.

A training task's simulated duration comes from the population (clients.json) and the
task's size, never from the real time it took (`duration`). An update that arrives is
held (`RoundQueue.hold`) and waits in tasks/clock.py's event order; when its turn comes
it goes into its round through the same intake as under the real clock, and the round
closes (first C arrivals, deadline, retry) at simulated times. Asynchronous rules
have their own event model, C clients in flight (virtual_async.py). The caller
holds the state's lock.
"""

from __future__ import annotations

from typing import Any

from fedsim.aggregator import intake, tasks, virtual_async
from fedsim.aggregator.snapshot import Snapshot
from fedsim.aggregator.strategies import Refused, Update
from fedsim.aggregator.tasks.clock import VirtualClock, task_durations
from fedsim.aggregator.tasks.virtual_rounds import Rounds
from fedsim.aggregator.virtual_async import Flights

Sim = Rounds | Flights


def driver(core: Any, now: Any) -> Sim | None:
    """The simulation of `core` (the state) under CLOCK=virtual: a round rule's rounds, or
    an asynchronous rule's clients in flight (virtual_async.py); None under CLOCK=real.
    `now()` is the real clock, which the intake's checkpoint timer runs on."""
    settings, queue = core.settings, core.queue
    if settings.clock != "virtual":
        return None
    if core.strategy.mode == "async":
        return virtual_async.driver(core, now)
    assert isinstance(queue, tasks.RoundQueue) and isinstance(queue.run_clock, VirtualClock)
    duration = task_durations(settings, core.population, queue.clients)

    def deliver(update: Update, at: float) -> None:
        intake.add_to_round(core, update, core.snapshot.version, now())

    def end(why: str, at: float) -> None:
        intake.close_round_if_due(core, now())

    return Rounds(queue, queue.run_clock, duration, deliver, end)


def arrive(core: Any, sim: Sim, update: Update) -> None:
    """An update arrived: held until its simulated turn, then taken with every event due by
    then. Raises Refused when its task is not awaited (nothing changes)."""
    if isinstance(sim, Flights):
        virtual_async.arrive(core, sim, update)
        return
    task = update.task_id
    assert task is not None
    sim.sync(core.snapshot.version)
    if task not in sim.clock.outstanding:
        raise Refused(
            "round_closed", f"task {task} is no longer awaited: its round ended in simulated time"
        )
    sim.queue.hold(task)
    sim.queue.record_update(task, update.lease)  # its lease ends: the update is in
    sim.arrive(task, update, lambda: core.snapshot.version)


def catch_up(core: Any, sim: Sim | None) -> None:
    """Take the events due (a round to open, a deadline, a client in flight to start)."""
    if isinstance(sim, Flights):
        virtual_async.run(core, sim)
    elif sim is not None:
        sim.run(lambda: core.snapshot.version)


def base(sim: Sim | None, version: int) -> Snapshot | None:
    """A version tasks start from that the simulation keeps (asynchronous rules), or None."""
    return virtual_async.base(sim, version)
