"""Asynchronous rules' plan under CLOCK=virtual (aggregator/tasks/flights.py): C clients in
flight, updates applied in simulated-finish order whatever the real one."""

from __future__ import annotations

import random

import pytest

from fedsim.aggregator import tasks
from fedsim.aggregator.strategies import Refused
from fedsim.aggregator.tasks.clock import VirtualClock
from fedsim.aggregator.tasks.flights import FlightQueue
from fedsim.data.population import Population
from fedsim.protocol import TrainTask
from helpers import FakeClock

TRAINING = {"model": "mlp", "epochs": 1, "batch_size": 10, "learning_rate": 0.1, "optimizer": "sgd"}
CLIENTS = 20


def population(speed: str = "lognormal:0,0.5", **more: str) -> Population:
    ids = [f"client-{n}" for n in range(1, CLIENTS + 1)]
    return Population.build({"SEED": 3, "CLIENT_SPEED": speed, **more}, ids)


def queue(pop: Population, *, per_round: int = 4, rounds: int = 5, online: bool = False):
    q = FlightQueue(
        [tasks.Client(n, 100, f"h{n}") for n in range(1, CLIENTS + 1)],
        next_online=(lambda n, t: pop.next_online(f"client-{n}", t)) if online else None,
        seed=7,
        per_round=per_round,
        rounds=rounds,
        task_timeout=1e9,
        training=TRAINING,
        partition={"PARTITION": "iid"},
        clock=FakeClock(),
        wall=lambda: 1.7e9,
        run_clock=VirtualClock(),
    )
    q.duration = lambda n, task: pop.duration(f"client-{n}", 100, 1, 0.0, 0.0, 0.15)
    return q


def simulate(q: FlightQueue, order_seed: int, workers: int, buffer: int = 1):
    """Workers push in a real order shuffled by `order_seed`; each `buffer` applied updates
    make a version (fedasync: 1, fedbuff: K), as the state would. Each applied update as
    (task, simulated finish, base version, staleness), and the real push order."""
    version, taken = [0], [0]
    applied: list[tuple[str, float, int, int]] = []
    rng = random.Random(order_seed)
    held: dict[str, TrainTask] = {}
    pushed: list[str] = []

    def run() -> None:
        while True:
            q.start(version[0])
            event = q.clock.next(q.start_at())
            if event is None:
                return
            if event.timer:
                continue
            flight = q.land(event.task)
            applied.append((event.task, round(event.at, 9), flight.base, version[0] - flight.base))
            taken[0] += 1
            if taken[0] % buffer == 0:
                version[0] += 1

    run()
    while not q.training_done:
        for w in range(workers):
            if f"w{w}" not in held:
                offer, _ = q.ask(f"w{w}", version[0])
                if isinstance(offer.task, TrainTask):
                    held[f"w{w}"] = offer.task
        assert held, "nothing handed out and nothing to push: the run is stuck"
        task = held.pop(rng.choice(sorted(held)))
        pushed.append(task.id)
        fresh = q.check_update(task.id, task.lease, task.client, task.base_version, version[0], 1)
        assert fresh
        q.record_update(task.id, task.lease)
        assert q.clock.arrive(task.id, task.id)
        run()
    return applied, pushed


@pytest.mark.parametrize("buffer", [1, 3])
def test_shuffled_real_orders_give_the_same_applied_order_and_staleness(buffer: int) -> None:
    pop = population()
    reference, first = simulate(queue(pop), order_seed=1, workers=1, buffer=buffer)
    assert len(reference) == 20 and len({task for task, *_ in reference}) == 20
    finishes = [at for _, at, _, _ in reference]
    assert finishes == sorted(finishes)  # applied in simulated-finish order
    assert any(stale > 0 for *_, stale in reference)
    orders = {tuple(first)}
    for order_seed, workers in ((2, 2), (3, 3), (4, 4), (5, 9)):
        applied, pushed = simulate(queue(pop), order_seed, workers, buffer)
        orders.add(tuple(pushed))
        assert applied == reference
    assert len(orders) > 1  # the real orders did differ


def test_each_update_starts_on_the_version_current_at_its_start() -> None:
    pop = population()
    applied, _ = simulate(queue(pop), order_seed=1, workers=3)
    # fedasync: every finish makes a version, so the update started at the k-th finish
    # starts from version k; the first C start together from version 0.
    started_at = {task: base for task, _, base, _ in applied}
    n_of = {task: int(task[1:].split(".")[0]) for task in started_at}
    for task, base in started_at.items():
        assert base == max(0, n_of[task] - 4)


def test_slow_clients_come_back_staler_than_fast_ones() -> None:
    pop = population("slow:0.1,10")
    slow = {n for n in range(1, CLIENTS + 1) if pop.client(f"client-{n}").speed > 1}
    assert slow and len(slow) < CLIENTS
    applied, _ = simulate(queue(pop, rounds=40), order_seed=1, workers=2)
    of = {True: [], False: []}
    for task, _, _, stale in applied:
        of[int(task.split(".c")[1]) in slow].append(stale)
    assert of[True] and of[False]
    assert sum(of[True]) / len(of[True]) > 2 * sum(of[False]) / len(of[False])


def test_clients_in_flight_are_not_drawn_again_and_offline_ones_wait() -> None:
    pop = population("1", AVAILABILITY="diurnal:0.3")
    q = queue(pop, online=True)
    q.start(0)
    online = [n for n in range(1, CLIENTS + 1) if pop.online(f"client-{n}", 0.0)]
    flying = [f.client for f in q.flying.values()]
    assert len(set(flying)) == len(flying) and set(flying) <= set(online)
    applied, _ = simulate(q, order_seed=2, workers=2)
    for task, at, _, _ in applied:
        n = int(task.split(".c")[1])
        start = at - q.duration(n, task)
        assert pop.online(f"client-{n}", start)  # each started while its client was online


def test_a_result_trained_from_another_version_is_refused_as_stale() -> None:
    q = queue(population())
    q.start(0)
    offer, _ = q.ask("w0", 0)
    task = offer.task
    assert isinstance(task, TrainTask) and task.base_version == 0
    with pytest.raises(Refused, match="starts from version 0"):
        q.check_update(task.id, task.lease, task.client, 3, 3, 1)
    with pytest.raises(Refused):
        q.check_update("u99.c1", task.lease, task.client, 0, 0, 1)  # never started


def test_the_plan_is_saved_and_resumed_and_a_bad_one_refused() -> None:
    pop = population()
    half = queue(pop)
    half.start(0)
    for task in sorted(half.flying.values(), key=lambda f: f.n):
        half.clock.arrive(task.task, task.task)
    event = half.clock.next()
    half.land(event.task)
    half.start(1)
    state, now = half.state_dict(), half.clock.state_dict()
    again = queue(pop)
    again.load_state_dict(state)
    again.clock.load_state_dict(now)
    assert again.start(1) == []  # awaits the saved flights again; the slots are full
    assert again.flying == half.flying and again.landed == {int(event.task[1:].split(".")[0])}
    assert again.clock.outstanding == {
        f.task: half.clock.finish_of(f.task) for f in half.flying.values()
    }
    for bad in ({"clients_of": [99]}, {"clients_of": [1], "flying": [[1, 0, -1.0]]}, {"flying": 3}):
        with pytest.raises(ValueError, match="bad"):
            queue(pop).load_state_dict(bad)
    with pytest.raises(ValueError, match="made under CLOCK=real"):
        queue(pop).load_state_dict({"updates_done": "1-3"})  # a SampledQueue's progress
