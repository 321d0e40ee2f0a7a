"""The virtual clock (aggregator/tasks/clock.py): simulated-arrival order whatever the real one."""

from __future__ import annotations

import random

import pytest

from fedsim.aggregator import tasks
from fedsim.aggregator.strategies import Refused
from fedsim.aggregator.tasks.clock import VirtualClock
from fedsim.aggregator.tasks.virtual_rounds import Rounds
from fedsim.data.population import Population
from fedsim.protocol import TrainTask
from helpers import FakeClock

TRAINING = {"model": "mlp", "epochs": 1, "batch_size": 10, "learning_rate": 0.1, "optimizer": "sgd"}
CLIENTS = 12


# --- the event order -------------------------------------------------------------------------


def test_an_update_waits_until_every_earlier_task_has_arrived() -> None:
    clock = VirtualClock()
    for task, finish in (("a", 5.0), ("b", 3.0), ("c", 9.0)):
        clock.schedule(task, 0.0, finish)
    assert clock.arrive("a", "A") and clock.next() is None  # b finishes first and is out
    assert clock.arrive("c", "C") and clock.next() is None
    assert clock.arrive("b", "B")
    order = [(e.at, e.item) for e in iter(clock.next, None)]
    assert order == [(3.0, "B"), (5.0, "A"), (9.0, "C")] and clock.now == 9.0


def test_ties_go_by_task_id_and_a_cancelled_task_is_not_awaited() -> None:
    clock = VirtualClock(now=10.0)
    for task in ("r1.c2", "r1.c1", "r1.c3"):
        clock.schedule(task, 10.0, 4.0)
    clock.arrive("r1.c2", 2)
    assert clock.next() is None  # r1.c1 ties at 14 and comes first
    clock.cancel("r1.c1")
    event = clock.next()  # r1.c3 ties too, and sorts after r1.c2
    assert event is not None and (event.at, event.task, event.item) == (14.0, "r1.c2", 2)
    assert not clock.arrive("r1.c1", 1)  # no longer awaited


def test_a_timer_fires_once_nothing_before_it_is_outstanding() -> None:
    clock = VirtualClock()
    clock.schedule("slow", 0.0, 100.0)
    clock.schedule("fast", 0.0, 20.0)
    assert clock.next(timer=50.0) is None  # fast, at 20, has not arrived
    clock.arrive("fast", "F")
    assert clock.next(timer=50.0).item == "F"
    timer = clock.next(timer=50.0)
    assert timer is not None and timer.timer and clock.now == 50.0
    clock.schedule("edge", 0.0, 60.0)
    clock.arrive("edge", "E")
    assert clock.next(timer=60.0).item == "E"  # an arrival at the deadline counts


def test_the_simulated_time_is_saved_and_a_bad_one_refused() -> None:
    clock = VirtualClock(now=12.5)
    again = VirtualClock()
    again.load_state_dict(clock.state_dict())
    assert again.now == 12.5
    for bad in (-1, "x", True, float("nan")):
        with pytest.raises(ValueError, match="bad run time"):
            again.load_state_dict({"now": bad})


# --- whole runs: the same history whatever the real order and the workers --------------------


def population() -> Population:
    ids = [f"client-{n}" for n in range(1, CLIENTS + 1)]
    return Population.build({"SEED": 3, "CLIENT_SPEED": "lognormal:0,0.5"}, ids)


def simulate(order_seed: int, workers: int, **kw) -> tuple[list[tuple], list[str]]:
    """A run of 4 rounds of 4 clients asked 6 (OVERSELECT=1.5), deadline 25 simulated s and
    quorum 2, pushes in a real order shuffled by `order_seed`. The history (what each round
    made, in simulated time) and the real push order."""
    pop = population()
    q = tasks.RoundQueue(
        [tasks.Client(n, 100, f"h{n}") for n in range(1, CLIENTS + 1)],
        seed=7,
        per_round=4,
        rounds=4,
        task_timeout=1e9,
        training=TRAINING,
        partition={"PARTITION": "iid"},
        clock=FakeClock(),
        wall=lambda: 1.7e9,
        quorum=2,
        **{"overselect": 1.5, "deadline": 25.0, **kw},
    )
    history: list[tuple] = []
    version = [0]

    def end(why: str, at: float) -> None:
        if why == tasks.RETRY:
            failed = q.retry(at)
            history.append(("retry", failed.number, failed.attempt, round(at, 9)))
        else:
            r = q.close(why)
            version[0] += 1
            history.append((version[0], r.number, r.attempt, sorted(r.updates), round(at, 9)))

    def duration(n: int, task: str) -> float:
        return pop.duration(f"client-{n}", 100, 1, 0.0, 0.0, 0.15)

    sim = Rounds(q, VirtualClock(), duration, lambda item, at: q.add_update(item, item, at), end)
    rng = random.Random(order_seed)
    held: dict[str, TrainTask] = {}  # worker -> the task it trains
    pushed: list[str] = []
    while not q.training_done:
        sim.sync(version[0])
        for w in range(workers):
            if f"w{w}" not in held:
                offer, _ = q.ask(f"w{w}", version[0])
                if isinstance(offer.task, TrainTask):
                    held[f"w{w}"] = offer.task
        assert held, "nothing handed out and nothing to push: the run is stuck"
        task = held.pop(rng.choice(sorted(held)))
        pushed.append(task.id)
        try:
            fresh = q.check_update(task.id, task.lease, task.client, task.base_version,
                                   version[0], 1)  # fmt: skip
        except Refused:
            continue  # its round closed (over-selected, or a failed attempt)
        assert fresh
        sim.arrive(task.id, task.id, lambda: version[0])
    return history, pushed


def test_the_same_seed_gives_the_same_history_whatever_the_real_order_and_workers() -> None:
    reference, first_order = simulate(order_seed=1, workers=1)
    assert [h[0] for h in reference if h[0] != "retry"] == [1, 2, 3, 4]
    orders = {tuple(first_order)}
    for order_seed, workers in ((2, 2), (3, 2), (4, 3), (5, 6)):
        history, pushed = simulate(order_seed, workers)
        orders.add(tuple(pushed))
        assert history == reference
    assert len(orders) == 5  # the real orders did differ


def test_the_first_arrivals_in_simulated_time_make_the_round() -> None:
    history, _ = simulate(order_seed=1, workers=2)
    pop = population()
    first = next(h for h in history if h[0] == 1)
    asked = tasks.sample(7, 1, 6, CLIENTS)
    fastest = sorted(asked, key=lambda n: (pop.client(f"client-{n}").speed, f"r1.c{n}"))[:4]
    finish = max(pop.duration(f"client-{n}", 100, 1, 0.0, 0.0, 0.15) for n in fastest)
    if finish <= 25.0:  # the four fastest of the six asked, at the fourth's finish
        assert first[3] == sorted(fastest) and first[4] == pytest.approx(finish, abs=1e-9)
    else:  # or the deadline, with those in by then
        assert first[4] == 25.0 and len(first[3]) >= 2
