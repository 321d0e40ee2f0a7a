"""CLOCK=virtual through the aggregator (aggregator/virtual.py): the same seed gives the same
history, versions and clients, whatever the real order of the pushes and the workers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import helpers
from helpers import ROUNDS, answer, ask, post, state_of

VIRTUAL = {
    **ROUNDS,
    "CLIENTS_PER_ROUND": 3,
    "OVERSELECT": 1.5,  # asks 5, keeps the first 3 in simulated time
    "ROUND_DEADLINE": "auto",
    "ROUNDS": 3,
    "CLOCK": "virtual",
    "CLIENT_SPEED": "lognormal:0,0.5",
    "SAVE_MODEL": 1,
}


def fill(task_id: str) -> float:
    """Each task's update: a value of its own, so versions differ when their updates do."""
    return int(hashlib.sha256(task_id.encode()).hexdigest()[:6], 16) / 2**24


def prepared(make_settings, model_dir: Path, **rule: object) -> dict:
    return helpers.planned(make_settings, model_dir, VIRTUAL, **rule)


def run(make_app, rule: dict, order_seed: int, workers: int, stop_after: int | None = None):
    """helpers.drive with each task's update a value of its own."""
    return helpers.drive(
        make_app, rule, order_seed, workers, lambda _, task: fill(task["id"]), stop_after=stop_after
    )


def test_the_same_seed_gives_the_same_history_whatever_the_real_order(
    make_app, make_settings, tmp_path
) -> None:
    histories, models, orders = [], [], []
    for order_seed, workers in ((1, 1), (2, 2), (3, 5)):
        rule = prepared(make_settings, tmp_path / f"run-{order_seed}")
        history, model, pushed = run(make_app, rule, order_seed, workers)
        histories.append(history)
        models.append(model)
        orders.append([task for task, _ in pushed])
    assert [h[0] for h in histories[0]] == [0, 1, 2, 3]
    # Round 1 waits up to TASK_TIMEOUT (no arrivals to learn from yet): its first 3 of the
    # 5 asked; later rounds may close at the auto deadline learnt from round 1, with fewer.
    assert len(histories[0][1][2]) == 3 and all(h[2] for h in histories[0][1:])
    assert histories[0][3][3] > histories[0][1][3] > 0  # simulated seconds go on
    assert histories[1] == histories[0] and histories[2] == histories[0]
    assert models[1] == models[0] and models[2] == models[0]
    assert orders[0] != orders[1] and orders[1] != orders[2]  # the real orders differed


def test_an_update_early_in_real_time_waits_for_its_simulated_turn(
    make_app, make_settings, tmp_path
) -> None:
    rule = prepared(make_settings, tmp_path / "models", OVERSELECT=1, CLIENT_SPEED="1")
    app = make_app(**rule)
    client = app.test_client()
    ask(client)  # the evaluation of version 0
    given = [ask(client, f"wk-{i}")["task"] for i in range(3)]
    state = state_of(app)
    finish = {t["id"]: state.sim.clock.finish_of(t["id"]) for t in given}
    # Equal speeds, equal samples: the three finish together, taken in task-id order.
    assert len(set(finish.values())) == 1
    last = max(given, key=lambda t: t["id"])
    reply = post(client, answer(last, 1.0))
    assert reply.status_code == 200 and reply.get_json()["version"] == 0
    assert post(client, answer(last, 1.0)).get_json()["duplicate"] is True  # held: a repeat
    status = client.get("/v1/status").get_json()
    assert status["round"]["pending"] == 0 and status["clock"]["sim_seconds"] == 0.0
    for t in sorted(given, key=lambda t: t["id"])[:2]:
        post(client, answer(t, 1.0))
    status = client.get("/v1/status").get_json()
    assert status["version"] == 1
    assert status["clock"] == {"kind": "virtual", "sim_seconds": round(finish[last["id"]], 3)}


# Stopped after 2 pushes: nothing taken yet; after 4: two updates in round 1 (simulated
# time 4.46 s); after 6: round 2 just opened; after 9: one update in round 2.
@pytest.mark.parametrize("stop_after", [2, 4, 6, 9])
def test_resume_mid_round_under_the_virtual_clock_continues_the_same_history(
    make_app, make_settings, tmp_path, stop_after: int
) -> None:
    rule = prepared(make_settings, tmp_path / "straight")
    reference, _, _ = run(make_app, rule, order_seed=1, workers=2)
    rule = prepared(make_settings, tmp_path / "resumed")
    app, _, _ = run(make_app, rule, order_seed=1, workers=2, stop_after=stop_after)
    state_of(app).save_if_due(force=True)  # the shutdown checkpoint
    # A new aggregator on the same MODEL_DIR: the workers' tasks are pushed again.
    history, _, _ = run(make_app, rule, order_seed=7, workers=3)
    assert history == reference


def test_a_journal_replay_under_the_virtual_clock_awaits_only_the_missing_updates(
    make_app, make_settings, tmp_path
) -> None:
    rule = prepared(make_settings, tmp_path / "models", DURABLE="true", SAVE_MODEL=100)
    reference, _, _ = run(make_app, prepared(make_settings, tmp_path / "ref"), 1, 2)
    app, _, _ = run(make_app, rule, order_seed=1, workers=2, stop_after=4)
    state = state_of(app)
    assert state.queue.round is not None and state.queue.round.updates  # some taken
    # A hard kill: no checkpoint, the journal replays the updates taken; the new
    # aggregator awaits only the round's other tasks, and the history is the same.
    state.saver.journal.close()
    history, _, _ = run(make_app, rule, order_seed=5, workers=3)
    assert history == reference
