"""Leases of dropped tasks: given back or run out, a task goes to the next worker as a new
attempt, and the attempts of open tasks are saved with the queue."""

from __future__ import annotations

import pytest

from fedsim.aggregator import tasks
from fedsim.aggregator.strategies import Refused
from fedsim.protocol import Profile, TrainTask
from helpers import FakeClock

TRAINING = {"model": "mlp", "epochs": 1, "batch_size": 10, "learning_rate": 0.1, "optimizer": "sgd"}
PLAN = {"PARTITION": "iid", "SEED": 7, "NUM_CLIENTS": 4}


def rounds(clock: FakeClock, **kw) -> tasks.RoundQueue:
    clients = [tasks.Client(c, 100 * c, f"h{c}") for c in range(1, 5)]
    return tasks.RoundQueue(
        clients,
        seed=7,
        per_round=2,
        rounds=3,
        task_timeout=30.0,
        training=TRAINING,
        partition=PLAN,
        clock=clock,
        wall=lambda: 1.7e9,
        quorum=2,
        deadline=600.0,
        **kw,
    )


def take(q: tasks.Queue, uid: str) -> TrainTask:
    offer, _ = q.ask(uid, 0)
    assert isinstance(offer.task, TrainTask), offer
    return offer.task


def test_a_task_given_back_goes_to_the_next_worker_as_its_next_attempt() -> None:
    q = rounds(FakeClock())
    first = take(q, "a-1-aa")
    assert first.attempt is None
    assert q.give_back(first.id, first.lease) == ("w1", first.client, 0)
    assert q.workers["a-1-aa"].task is None
    again = take(q, "b-2-bb")  # the first task of the round is free again: it comes first
    assert (again.id, again.attempt, again.worker) == (first.id, 1, "w2")
    assert again.lease != first.lease


def test_a_lease_that_runs_out_counts_an_attempt_too() -> None:
    """DROPOUT_MODE=silent: the worker says nothing; after TASK_TIMEOUT the task is offered
    again, and its next attempt draws its dropout anew."""
    clock = FakeClock()
    q = rounds(clock)
    first = take(q, "a-1-aa")
    second = take(q, "a-1-aa")
    assert second.id != first.id
    clock.advance(30.0)
    again = take(q, "b-2-bb")
    assert (again.id, again.attempt) == (first.id, 1)
    assert [t for t, _ in q.drain_expired()] == [first.id, second.id]


def test_a_give_back_under_another_lease_is_refused_and_changes_nothing() -> None:
    clock = FakeClock()
    q = rounds(clock)
    first = take(q, "a-1-aa")
    with pytest.raises(Refused) as caught:
        q.give_back(first.id, "0" * 64)  # never handed out with it
    assert caught.value.code == "not_leased"
    clock.advance(30.0)  # runs out, then another worker takes it
    again = take(q, "b-2-bb")
    with pytest.raises(Refused) as caught:
        q.give_back(first.id, first.lease)
    assert caught.value.code == "not_held" and "nothing to give back" in caught.value.reason
    assert q.leases[first.id].token == again.lease  # still the new worker's
    assert q.attempts[first.id] == 1


def test_a_done_task_forgets_its_attempts() -> None:
    q = rounds(FakeClock())
    first = take(q, "a-1-aa")
    q.give_back(first.id, first.lease)
    again = take(q, "a-1-aa")
    assert q.check_update(again.id, again.lease, again.client, 0, 0, 10)
    q.record_update(again.id, again.lease)
    assert q.attempts_state() == {}


def test_attempts_are_saved_and_restored_and_a_bad_entry_is_skipped() -> None:
    q = rounds(FakeClock())
    first = take(q, "a-1-aa")
    q.give_back(first.id, first.lease)
    saved = q.attempts_state()
    assert saved == {first.id: 1}
    restored = rounds(FakeClock())
    restored.load_attempts({**saved, "r1.c9": -1, "r1.c8": "x", "r1.c7": True})
    assert restored.attempts == {first.id: 1}
    assert take(restored, "b-2-bb").attempt == 1
    restored.load_attempts(None)  # an older checkpoint without attempts
    assert restored.attempts == {}


def test_a_task_carries_its_clients_profile_when_there_is_one() -> None:
    profile = Profile(speed=3.0, bandwidth=1e6, dropout=0.1)
    q = rounds(FakeClock(), profiles={f"client-{n}": profile for n in range(1, 5)})
    assert take(q, "a-1-aa").profile == profile
    assert rounds(FakeClock()).ask("a-1-aa", 0)[0].task.profile is None
