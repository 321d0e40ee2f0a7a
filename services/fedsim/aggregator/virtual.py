"""CLOCK=virtual in the aggregator: round rules' updates taken in simulated-arrival order.

A training task's simulated duration comes from the population (clients.json) and the
task's size, never from the real time it took (`duration`). An update that arrives is
held (`RoundQueue.hold`) and waits in tasks/clock.py's event order; when its turn comes
it goes into its round through the same intake as under the real clock, and the round
closes (first C arrivals, deadline, retry) at simulated times. The caller holds the
state's lock.
"""

from __future__ import annotations

from typing import Any

from fedsim.aggregator import intake, tasks
from fedsim.aggregator.strategies import Refused, Update
from fedsim.aggregator.tasks import ids
from fedsim.aggregator.tasks.clock import (
    SECONDS_PER_SAMPLE,
    Rounds,
    VirtualClock,
    simulated_duration,
)
from fedsim.data.population import drop_draw
from fedsim.models import parameter_count


def driver(core: Any, now: Any) -> Rounds | None:
    """The simulation of `core` (the state) under CLOCK=virtual with a round rule; None
    otherwise. `now()` is the real clock, which the intake's checkpoint timer runs on."""
    settings, queue = core.settings, core.queue
    if settings.clock != "virtual":
        return None
    # config.load refuses CLOCK=virtual with an asynchronous rule.
    assert isinstance(queue, tasks.RoundQueue) and isinstance(queue.run_clock, VirtualClock)
    population = core.population
    per_sample = SECONDS_PER_SAMPLE[settings.model]
    nbytes = 4.0 * parameter_count(settings.model)  # float32 weights, pulled and pushed

    def duration(number: int, task_id: str) -> float:
        client = queue.clients[number]
        samples = client.samples // len(client.slice_numbers) if client.slices else client.samples
        one = population.duration(client.id, samples, settings.epochs, nbytes, nbytes, per_sample)
        seed = ids.task_seed(settings.seed, task_id)
        return simulated_duration(
            one,
            population.client(client.id).dropout,
            lambda attempt: drop_draw(seed, attempt),
            settings.dropout_mode,
            settings.task_timeout,
        )

    def deliver(update: Update, at: float) -> None:
        intake.add_to_round(core, update, core.snapshot.version, now())

    def end(why: str, at: float) -> None:
        intake.close_round_if_due(core, now())

    return Rounds(queue, queue.run_clock, duration, deliver, end)


def arrive(core: Any, sim: Rounds, update: Update) -> None:
    """A round rule's update arrived: held until its simulated turn, then taken with every
    event due by then. Raises Refused when its task is not awaited (nothing changes)."""
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


def catch_up(core: Any, sim: Rounds | None) -> None:
    """Take the events due (a round to open, a deadline with nothing left to wait for)."""
    if sim is not None:
        sim.run(lambda: core.snapshot.version)
