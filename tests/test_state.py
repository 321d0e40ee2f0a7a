"""fedsim.aggregator.state on a real State (no HTTP): submit and dedup, the rule step and
publishing, rounds that close, the checkpoint schedule, and metrics called as methods."""

from __future__ import annotations

from collections.abc import Callable
from unittest.mock import create_autospec

import numpy as np
import pytest

from fedsim import checkpoints, pipeline
from fedsim.aggregator import ledger
from fedsim.aggregator.metrics import Recorder
from fedsim.aggregator.state import State
from fedsim.aggregator.strategies import Refused, Update
from fedsim.protocol import EvalTask, TrainTask
from helpers import ROUNDS, FakeClock, tensors, write_plan, write_v0


def names(recorder) -> list[str]:
    """The measurements made, in order (the recorder is an autospec of Recorder, so a call
    with a name or arguments Recorder does not have fails)."""
    return [call[0] for call in recorder.method_calls]


@pytest.fixture
def make_state(make_settings, clock: FakeClock) -> Callable[..., State]:
    """A State resumed from a fresh MODEL_DIR holding version 0 (all zeros) and its plan."""

    def make(**overrides: object) -> State:
        settings = make_settings(**{"MODEL": "mlp", **overrides})
        if not checkpoints.versions(settings.model_dir):
            write_v0(settings.model_dir)
            write_plan(settings)
        made = State.resume(settings, clock=clock)
        made.metrics = create_autospec(Recorder, instance=True)
        return made

    return make


def update(
    fill: float, client: str = "client-1", update_id: str = "u-1", base: int = 0, n: int = 100
) -> Update:
    """A hand-started client's update: every weight `fill`."""
    return Update(client, update_id, base, n, tensors("mlp", fill), {"loss": 0.5})


def answer(task: TrainTask, fill: float) -> Update:
    """A worker's update for `task`: every weight `fill`."""
    weights = tensors("mlp", fill)
    return Update(
        task.client, task.id, task.base_version, task.samples, weights, {}, task.id, task.lease
    )


def train_task(made: State, worker: str) -> TrainTask:
    """A training task for `worker`, once version 0 is scored (its score is offered first)."""
    offer, _ = made.ask(worker)
    if isinstance(offer.task, EvalTask):
        made.record_evaluation(offer.task.id, offer.task.lease, 0.1, 2.3, worker)
        offer, _ = made.ask(worker)
    assert isinstance(offer.task, TrainTask), offer
    return offer.task


def mean_weight(made: State) -> float:
    return float(np.mean(next(iter(made.snapshot.tensors.values()))))


# --- submit and dedup -------------------------------------------------------------------


def test_an_update_makes_the_next_version_with_its_number(make_state) -> None:
    made = make_state()

    result = made.submit(update(2.0))

    assert (result.version, result.duplicate, result.seq) == (1, False, 1)
    assert made.snapshot.version == 1 and made.snapshot.samples == 100
    assert mean_weight(made) == pytest.approx(2.0)
    assert made.lookup("u-1") == {"update_id": "u-1", "state": "applied", "version": 1, "seq": 1}
    assert names(made.metrics) == ["update_accepted", "set_version", "aggregation_seconds"]


def test_a_repeated_update_id_is_acknowledged_once_and_changes_nothing(make_state) -> None:
    made = make_state()
    made.submit(update(2.0))
    before = made.snapshot

    again = made.submit(update(7.0, client="client-2"))

    assert (again.version, again.duplicate, again.seq) == (1, True, 1)
    assert made.snapshot is before
    assert made.status()["updates"] == 1
    assert names(made.metrics)[-1] == "update_duplicate"


def test_a_tasks_update_sent_twice_counts_once(make_state) -> None:
    made = make_state(PARTITION="iid", NUM_CLIENTS=4)
    task = train_task(made, "wk-1")
    made.metrics.reset_mock()

    first = made.submit(answer(task, 3.0))
    second = made.submit(answer(task, 3.0))

    assert (first.version, first.duplicate, first.seq) == (1, False, 1)
    assert (second.version, second.duplicate, second.seq) == (1, True, 1)
    assert names(made.metrics).count("task_finished") == 1
    assert names(made.metrics).count("update_duplicate") == 1


def test_an_update_without_a_task_is_refused_by_a_round_rule(make_state) -> None:
    made = make_state(**ROUNDS)

    with pytest.raises(Refused) as refused:
        made.submit(update(1.0))

    assert refused.value.code == "no_task"
    assert made.snapshot.version == 0 and made.status()["updates"] == 0


def test_an_update_without_a_task_is_at_most_one_slice(make_state) -> None:
    made = make_state()
    too_many = made.settings.num_images_train + 1

    with pytest.raises(Refused) as refused:
        made.submit(update(1.0, n=too_many))

    assert (refused.value.code, refused.value.status) == ("bad_num_samples", 422)
    assert made.snapshot.version == 0


# --- the rule step and publishing -------------------------------------------------------


@pytest.mark.parametrize("fill", [np.nan, np.inf, 2 * pipeline.MAX_WEIGHT])
def test_an_aggregate_that_is_not_finite_or_too_large_is_never_published(make_state, fill):
    made = make_state()
    before = made.snapshot

    with pytest.raises(Refused) as refused:
        made.submit(update(fill))

    assert refused.value.code == "bad_aggregate"
    assert made.snapshot is before
    assert made.lookup("u-1")["state"] == "unknown"
    assert "update_accepted" not in names(made.metrics)


def test_a_refused_step_puts_the_rules_state_back(make_state) -> None:
    # fedbuff counts what it holds; a refused update must not move the count.
    made = make_state(AGGREGATION="fedbuff", FEDBUFF_K=2)
    made.submit(update(1.0))  # held: the buffer has one
    saved = made.strategy.state_dict()

    with pytest.raises(Refused):
        made.submit(update(np.nan, client="client-2", update_id="u-2"))

    assert made.strategy.state_dict() == saved
    assert made.snapshot.version == 0
    assert made.lookup("u-1")["state"] == "pending"


def test_a_buffering_rule_holds_updates_then_makes_one_version(make_state) -> None:
    made = make_state(AGGREGATION="fedbuff", FEDBUFF_K=2)

    held = made.submit(update(1.0))
    made_version = made.submit(update(3.0, client="client-2", update_id="u-2"))

    assert (held.version, held.seq) == (0, None)
    assert (made_version.version, made_version.seq) == (1, 2)
    assert made.held == []
    assert [r["update_id"] for r in made.status()["history"]] == ["u-1", "u-2"]


def test_an_asynchronous_rules_step_is_timed_whether_it_holds_or_makes_a_version(
    make_state,
) -> None:
    made = make_state(AGGREGATION="fedbuff", FEDBUFF_K=2)

    made.submit(update(1.0))  # held
    made.submit(update(3.0, client="client-2", update_id="u-2"))  # a version

    timed = [c.args[0] for c in made.metrics.method_calls if c[0] == "aggregation_seconds"]
    assert len(timed) == 2 and all(seconds >= 0 for seconds in timed)


# --- rounds ------------------------------------------------------------------------------


def test_a_round_closes_when_its_sampled_clients_answered(make_state) -> None:
    made = make_state(**ROUNDS)
    first, second = train_task(made, "wk-1"), train_task(made, "wk-2")

    waiting = made.submit(answer(first, 2.0))
    assert (waiting.version, waiting.seq) == (0, None)  # the round holds it
    closed = made.submit(answer(second, 4.0))

    assert (closed.version, closed.duplicate) == (1, False)
    assert mean_weight(made) == pytest.approx(3.0)  # equal samples: the plain mean
    record = made.evaluations.waiting[1]
    assert record.round == 1 and record.updates == 2
    assert record.clients == sorted({first.client, second.client})
    assert names(made.metrics).count("aggregation_seconds") == 1  # the round, not each update
    made.metrics.set_round.assert_called_once_with(2)


def test_a_round_closes_at_its_deadline_when_polled(make_state, clock) -> None:
    made = make_state(**ROUNDS, ROUND_DEADLINE=30)
    task = train_task(made, "wk-1")
    made.submit(answer(task, 2.0))
    clock.advance(29)
    assert made.poll().version == 0

    clock.advance(1)

    assert made.poll().version == 1
    assert mean_weight(made) == pytest.approx(2.0)
    assert made.status()["events"][-1]["text"].startswith("round 1 closed (deadline)")


# --- the checkpoint schedule (saving.py) -------------------------------------------------


def test_a_checkpoint_is_due_after_save_model_updates(make_state) -> None:
    made = make_state(SAVE_MODEL=2, IDLE_SAVE_SECONDS=1000)
    made.submit(update(1.0))
    assert made.save_if_due() is None

    made.submit(update(2.0, update_id="u-2"))
    path = made.save_if_due()

    assert path is not None and max(checkpoints.versions(made.settings.model_dir)) == 2
    assert made.lookup("u-1")["state"] == "saved"
    assert made.status()["unsaved_updates"] == 0
    assert "checkpoint_written" in names(made.metrics)


def test_the_reasons_for_a_checkpoint_in_their_order(make_state, clock) -> None:
    made = make_state(SAVE_MODEL=5, IDLE_SAVE_SECONDS=60)
    reason = made.saver.reason
    assert reason(clock(), force=True) is None  # nothing unsaved: not even at shutdown

    made.submit(update(1.0))

    assert reason(clock(), force=False) is None
    assert reason(clock() + 60, force=False) == "idle"
    assert reason(clock(), force=True) == "shutdown"


def test_close_writes_what_is_unsaved(make_state) -> None:
    made = make_state(SAVE_MODEL=100, IDLE_SAVE_SECONDS=1000)
    made.submit(update(1.0))

    made.close()

    resumed = State.resume(made.settings)
    assert resumed.snapshot.version == 1
    assert resumed.submit(update(9.0)).duplicate  # the id is remembered across the restart


def test_a_checkpoint_keeps_only_the_newest_ids(make_state, monkeypatch) -> None:
    monkeypatch.setattr(ledger, "SAVED_IDS", 2)
    made = make_state(SAVE_MODEL=100)
    for n in range(4):
        made.submit(update(1.0, update_id=f"u-{n}"))
    made.close()

    resumed = State.resume(made.settings)

    assert [resumed.lookup(f"u-{n}")["state"] for n in range(4)] == [
        "unknown",
        "unknown",
        "saved",
        "saved",
    ]
    assert resumed.lookup("u-0", seq=1)["forgotten"] is True
