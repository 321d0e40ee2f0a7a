"""Asynchronous rules under CLOCK=virtual through the aggregator (aggregator/virtual_async.py):
the same seed gives the same versions, whatever the real order of the pushes and the workers,
and after a restart."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

import helpers
from fedsim import weights
from fedsim.settings import ConfigError
from helpers import answer, ask, post, state_of, upload

FLIGHTS = {
    "AGGREGATION": "fedasync",
    "PARTITION": "iid",
    "NUM_CLIENTS": 10,
    "CLIENTS_PER_ROUND": 3,  # 3 clients in flight
    "ROUNDS": 3,  # 9 updates
    "CLOCK": "virtual",
    "CLIENT_SPEED": "lognormal:0,0.5",
    "EVAL_EVERY": 1,
    "SAVE_MODEL": 1,
    "KEEP_CHECKPOINTS": 20,
}


def prepared(make_settings, model_dir: Path, **rule: object) -> dict:
    return helpers.planned(make_settings, model_dir, FLIGHTS, **rule)


def trained(client, task: dict) -> float:
    """A worker's update: pulls the task's base version (as a worker does under CLOCK=virtual)
    and moves it by a value of the task's own, so the result hangs on the base it got."""
    reply = client.get(f"/v1/model?version={task['base_version']}")
    assert reply.status_code == 200, reply.get_json()
    tensors, meta = weights.decode(reply.data)
    assert int(meta["version"]) == task["base_version"]
    mean = float(np.mean(next(iter(tensors.values()))))
    return mean / 2 + int(hashlib.sha256(task["id"].encode()).hexdigest()[:6], 16) / 2**24


def run(make_app, rule: dict, order_seed: int, workers: int, stop_after: int | None = None):
    """helpers.drive with updates `trained` from the task's base version; the history
    (version, clients, simulated seconds)."""
    fields = ("version", "clients", "sim_seconds")
    return helpers.drive(make_app, rule, order_seed, workers, trained, fields, stop_after)


@pytest.mark.parametrize("rule", ["fedasync", "fedbuff", "async-weighted"])
def test_the_same_seed_gives_the_same_versions_whatever_the_real_order(
    make_app, make_settings, tmp_path, rule: str
) -> None:
    extra = {"FEDBUFF_K": 2} if rule == "fedbuff" else {}
    histories, models, orders = [], [], []
    for order_seed, workers in ((1, 1), (2, 3), (3, 5)):
        settings = prepared(
            make_settings, tmp_path / f"run-{order_seed}", AGGREGATION=rule, **extra
        )
        history, model, pushed = run(make_app, settings, order_seed, workers)
        assert all(code == 200 for _, code in pushed)
        histories.append(history)
        models.append(model)
        orders.append([task for task, _ in pushed])
    versions = 5 if rule == "fedbuff" else 9  # 9 updates, by 2 (the last one flushed alone)
    assert [h[0] for h in histories[0]] == list(range(versions + 1))
    times = [h[2] for h in histories[0]]
    assert times == sorted(times) and times[-1] > 0  # simulated seconds go on
    assert histories[1] == histories[0] and histories[2] == histories[0]
    assert models[1] == models[0] and models[2] == models[0]
    assert len({tuple(o) for o in orders}) == 3  # the real orders differed


def test_an_update_waits_for_the_earlier_finishes_and_staleness_follows_the_simulation(
    make_app, make_settings, tmp_path
) -> None:
    app = make_app(**prepared(make_settings, tmp_path / "models"))
    client = app.test_client()
    ask(client)  # the evaluation of version 0
    given = [ask(client, f"wk-{i}")["task"] for i in range(3)]
    assert all(t["base_version"] == 0 for t in given)
    assert ask(client, "wk-9")["task"] is None  # 3 in flight: nothing more has started
    sim = state_of(app).sim
    finish = {t["id"]: sim.queue.clock.finish_of(t["id"]) for t in given}
    order = sorted(given, key=lambda t: (finish[t["id"]], t["id"]))
    last = order[-1]
    reply = post(client, answer(last, trained(client, last)))
    assert reply.status_code == 200 and reply.get_json()["version"] == 0  # held: its turn later
    assert post(client, answer(last, 0.1)).get_json()["duplicate"] is True
    post(client, answer(order[0], trained(client, order[0])))
    status = client.get("/v1/status").get_json()
    assert status["version"] == 1 and status["clock"]["sim_seconds"] == round(
        finish[order[0]["id"]], 3
    )
    assert status["flights"] == {"in_flight": 3, "waiting": 1, "applied": 1, "updates": 9}
    # The freed slot starts a fourth client at that finish, on version 1.
    fourth = ask(client, "wk-3")["task"]
    if fourth["kind"] == "evaluate":  # version 1's score first
        fourth = ask(client, "wk-4")["task"]
    assert fourth["base_version"] == 1
    post(client, answer(order[1], trained(client, order[1])))
    # The slowest of the first three was held; it is taken once the fourth cannot finish
    # before it, with staleness 2 (versions 1 and 2 were made while it trained).
    if sim.queue.clock.finish_of(fourth["id"]) > finish[last["id"]]:
        assert client.get("/v1/status").get_json()["version"] == 3
        seen = {c["id"]: c for c in client.get("/v1/status?clients=all").get_json()["clients"]}
        assert seen[last["client"]]["staleness"] == 2


# Stopped after 2 pushes: one held, nothing applied; after 5 and 7: mid-run. With a
# checkpoint of every version, or only the one at shutdown (the flights' bases in it).
@pytest.mark.parametrize("stop_after", [2, 5, 7])
@pytest.mark.parametrize("save", [{}, {"SAVE_MODEL": 100, "KEEP_CHECKPOINTS": 1}])
def test_a_restart_mid_run_continues_the_same_history(
    make_app, make_settings, tmp_path, stop_after: int, save: dict
) -> None:
    reference, ref_model, _ = run(make_app, prepared(make_settings, tmp_path / "straight"), 1, 2)
    rule = prepared(make_settings, tmp_path / "resumed", **save)
    app, _, _ = run(make_app, rule, order_seed=1, workers=2, stop_after=stop_after)
    state = state_of(app)
    state.save_if_due(force=True)  # the shutdown checkpoint
    resumed = state.snapshot.version
    # A new aggregator on the same MODEL_DIR: the tasks in flight are handed out again.
    history, model, _ = run(make_app, rule, order_seed=7, workers=3)
    assert model == ref_model
    # A score still waiting at the restart is asked for again; the checkpoint kept the
    # clients its entry names.
    assert history == reference
    assert any(v == resumed for v, _, _ in history)


def test_a_journal_replay_takes_the_updates_in_their_flights_place(
    make_app, make_settings, tmp_path
) -> None:
    reference, _, _ = run(make_app, prepared(make_settings, tmp_path / "ref"), 1, 2)
    rule = prepared(make_settings, tmp_path / "models", DURABLE="true", SAVE_MODEL=100)
    app, _, _ = run(make_app, rule, order_seed=1, workers=2, stop_after=6)
    state = state_of(app)
    assert state.snapshot.version >= 2 and state.ledger.total >= 2  # some applied
    state.saver.journal.close()  # a hard kill: no checkpoint beyond version 0
    history, _, _ = run(make_app, rule, order_seed=5, workers=3)
    assert history == reference


def test_slices_stay_refused_under_the_virtual_clock(make_settings, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"CLOCK.*PARTITION=slices"):
        make_settings(**{**FLIGHTS, "PARTITION": "slices", "CLIENT_SLICES": "1-2 3-4 5-6"})


def test_an_update_without_a_task_is_refused_and_changes_nothing(
    make_app, make_settings, tmp_path
) -> None:
    app = make_app(**prepared(make_settings, tmp_path / "models"))
    client = app.test_client()
    before = client.get("/v1/status").get_json()
    body = upload(0.5, client_id="client-1", update_id="hand-1", base_version=0, num_samples=10)
    reply = post(client, body)
    assert reply.status_code == 409 and reply.get_json()["error"] == "no_task"
    after = client.get("/v1/status").get_json()
    assert (after["version"], after["updates"], after["flights"]) == (
        before["version"],
        before["updates"],
        before["flights"],
    )
