"""Differential privacy in a run: the noised mean through the API and a server optimizer,
epsilon in the history, /v1/status and /metrics, the budget's stop, and epsilon across
hard kills (the real app in this process; workers with a fake learner, no TensorFlow)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from flask import Flask

from fedsim import checkpoints, pipeline, weights
from fedsim.aggregator.app import create_app
from fedsim.aggregator.state import StartupError, State
from fedsim.aggregator.strategies import Global, Update
from fedsim.aggregator.strategies.fedopt import FedAdam
from fedsim.client.worker import Worker
from fedsim.evaluate import privacy_line, privacy_of
from fedsim.pipeline import dp
from helpers import (
    FakeLearner,
    InProcess,
    answer,
    ask,
    in_process_transport,
    post,
    state_of,
    tensors,
    write_plan,
    write_tokens,
    write_v0,
)
from helpers.dp import composed_epsilon

DP = {
    "DP": "central",
    "AGGREGATION": "fedavg",
    "PARTITION": "iid",
    "NUM_CLIENTS": 10,
    "CLIENTS_PER_ROUND": 2,
}


def score(client, task: dict) -> dict:
    done = client.post(
        "/v1/evaluations",
        json={
            "worker": "wk-1",
            "task": task["id"],
            "lease": task["lease"],
            "accuracy": 0.5,
            "loss": 1.0,
        },
    )
    assert done.status_code == 200, done.get_json()
    return done.get_json()["entry"]


def one_round(client, fills=(2.0, 4.0)) -> list[dict]:
    """Score v0 if asked, then answer the round's two tasks with models of `fills`."""
    trained = []
    while len(trained) < 2:
        task = ask(client, f"wk-{len(trained)}")["task"]
        if task["kind"] == "evaluate":
            score(client, task)
            continue
        trained.append(task)
    for task, fill in zip(trained, fills, strict=True):
        assert post(client, answer(task, fill)).status_code == 200
    return trained


# --- through the API ---------------------------------------------------------------------


def test_a_round_publishes_the_clipped_mean_plus_noise_and_reports_composed_epsilon(make_app):
    # Prepare: the aggregator clips; z = 1, S = 1, m = 2: noise std 0.5 per weight.
    app = make_app(**DP, DP_CLIP_AT="aggregator", DP_NOISE=1.0, DP_CLIP=1.0, ROUNDS=3)
    client = app.test_client()
    # Execute: two raw updates of all 2.0 and all 4.0 (norms about 893 and 1785).
    one_round(client)
    # Assert: both clip to 1/sqrt(n) per weight (the same direction), so the published model
    # is that plus the noise, whose std is z S / m.
    got, meta = weights.decode(client.get("/v1/model").data)
    assert meta["version"] == "1"
    flat = np.concatenate([t.astype(np.float64).ravel() for t in got.values()])
    residual = flat - 1 / np.sqrt(flat.size)
    assert residual.std() == pytest.approx(0.5, rel=0.01)
    # Epsilon after one round, at delta = 1 / 10^1.1, in the history, the status, /metrics.
    delta = 1 / 10**1.1
    expected = composed_epsilon(10, 2, 1.0, 1, delta)
    entry = score(client, ask(client)["task"])
    assert entry["round"] == 1 and entry["epsilon"] == pytest.approx(expected, rel=1e-5)
    assert entry["delta"] == pytest.approx(delta)
    block = client.get("/v1/status").get_json()["privacy"]
    assert block["mode"] == "central" and block["rounds_composed"] == 1
    assert block["epsilon"] == pytest.approx(expected, rel=1e-5)
    metrics = client.get("/metrics").get_data(as_text=True)
    line = next(x for x in metrics.splitlines() if x.startswith("fedsim_dp_epsilon "))
    assert float(line.split()[1]) == pytest.approx(expected, rel=1e-5)
    assert client.get("/v1/history").get_json()["history"][0].get("epsilon") == 0.0  # v0


def test_a_server_optimizer_steps_on_the_noised_average(make_app):
    # Prepare: fedadam under DP; workers clip (DP_CLIP_AT=worker) but these two did not.
    app = make_app(**{**DP, "AGGREGATION": "fedadam"}, DP_NOISE=0.5, DP_CLIP=1.0, ROUNDS=2)
    client = app.test_client()
    state = state_of(app)
    base = dict(state.snapshot.tensors)
    # Execute
    trained = one_round(client, fills=(2.0, 4.0))
    # Assert: the model is FedAdam's step on one update, the noised mean of the clipped ones.
    got, _ = weights.decode(client.get("/v1/model").data)
    raw = [tensors("mlp", 2.0), tensors("mlp", 4.0)]
    mean = pipeline.build(state.settings).gather(raw, base, 1)[0]
    expected = FedAdam(eta=0.03, beta1=0.9, beta2=0.99, tau=0.001).aggregate(
        Global(base, 0, 0), [Update(trained[0]["client"], "mean", 0, 1, mean)]
    )
    for name, tensor in expected.items():
        np.testing.assert_array_equal(got[name], tensor)


def test_no_noise_shows_an_infinite_composed_epsilon(make_app):
    client = make_app(**DP, DP_NOISE=0, ROUNDS=2).test_client()
    one_round(client)
    entry = score(client, ask(client)["task"])
    assert entry["epsilon"] is None
    assert client.get("/v1/status").get_json()["privacy"]["epsilon"] is None
    assert "fedsim_dp_epsilon +Inf" in client.get("/metrics").get_data(as_text=True)
    assert privacy_line(entry) == "privacy: ε = ∞ at δ = 0.0794 after round 1 (version 1)"


# --- runs with workers -------------------------------------------------------------------


def quick_sleep(seconds: float) -> None:
    time.sleep(min(seconds, 0.005))


def run(
    make_settings, crashes: tuple[int, ...] = (), key: bytes = b"", **overrides: object
) -> InProcess:
    """A whole run with one worker; the aggregator is killed (unsaved state lost) after the
    POSTs numbered in `crashes`. `key`: the central noise's key to start with."""
    settings = make_settings(**{"MODEL": "mlp", "IDLE_SAVE_SECONDS": 0.2, **DP, **overrides})
    write_v0(settings.model_dir)
    if key:
        (settings.model_dir / dp.KEY_FILE).write_text(key.hex())
    write_plan(settings)
    write_tokens(settings)

    def make_app() -> Flask:
        return create_app({"TESTING": True, "FEDSIM_SETTINGS": settings, "FEDSIM_TICKER": False})

    adapter = InProcess(make_app)

    def crash(adapter: InProcess, path: str) -> None:
        if adapter.posts in crashes:
            adapter.crash()

    adapter.after_post = crash
    worker = Worker(
        settings,
        in_process_transport(adapter),
        lambda n: FakeLearner(),
        uid="host-1-ab",
        sleep=quick_sleep,
    )
    thread = threading.Thread(target=worker.run)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the worker did not finish"
    return adapter


ADAPTIVE = {"DP_CLIP_AT": "aggregator", "DP_CLIP_QUANTILE": 0.5, "DP_CLIP_COUNT_NOISE": 1}


@pytest.mark.parametrize("extra", [{}, ADAPTIVE], ids=["fixed-clip", "adaptive-clip"])
def test_epsilon_and_weights_after_hard_kills_equal_an_unbroken_run(make_settings, tmp_path, extra):
    # The same DP run twice, with the same noise key: unbroken, and killed after the 3rd
    # and 7th POST (unsaved rounds lost, made again). Epsilon is recomputed from the rounds
    # the checkpoint saved; adaptive clipping's norm is saved in it.
    finals, privacies, histories = [], [], []
    key = bytes(range(32))
    for crashes in ((), (3, 7)):
        adapter = run(
            make_settings,
            crashes,
            key,
            ROUNDS=4,
            SAVE_MODEL=1,
            MODEL_DIR=str(tmp_path / f"r{len(crashes)}"),
            **extra,
        )
        status = adapter.app.test_client().get("/v1/status").get_json()
        assert status["finished"] is True and status["round"]["rounds_done"] == 4, status
        privacies.append(status["privacy"])
        histories.append(
            [
                (e["version"], e["epsilon"])
                for e in adapter.app.test_client().get("/v1/history").get_json()["history"]
            ]
        )
        final = checkpoints.load_newest(state_of(adapter.app).settings.model_dir)
        finals.append(final.tensors)
    assert privacies[0] == privacies[1]
    assert privacies[0]["adaptive_clipping"] is bool(extra)
    if extra:  # the norm moved from DP_CLIP=1 (the fake learner's updates are far longer)
        assert privacies[0]["clip"] != 1.0
    assert privacies[0]["epsilon"] == pytest.approx(
        composed_epsilon(10, 2, 1.0, 4, 1 / 10**1.1), rel=1e-5
    )
    assert histories[0] == histories[1] and [v for v, _ in histories[0]] == [0, 1, 2, 3, 4]
    for name in finals[0]:
        np.testing.assert_array_equal(finals[0][name], finals[1][name])


def test_the_budget_stops_the_run_with_a_checkpoint_and_a_reason(make_settings, tmp_path):
    # Prepare: a budget between epsilon after rounds 2 and 3, of ROUNDS=10.
    delta = 1 / 10**1.1
    budget = (composed_epsilon(10, 2, 1.0, 2, delta) + composed_epsilon(10, 2, 1.0, 3, delta)) / 2
    # Execute
    adapter = run(make_settings, ROUNDS=10, DP_EPSILON_BUDGET=budget)
    # Assert: two rounds, scored, checkpointed, and the reason in the status and the events.
    status = adapter.app.test_client().get("/v1/status").get_json()
    assert status["finished"] is True and status["round"]["rounds_done"] == 2, status
    assert status["version"] == 2 and status["privacy"]["rounds_allowed"] == 2
    assert status["privacy"]["epsilon"] <= budget
    reason = status["privacy"]["stop_reason"]
    assert reason.startswith(f"DP_EPSILON_BUDGET={budget:g}: round 3 would take epsilon to ")
    assert any(e["kind"] == "finished" and reason in e["text"] for e in status["events"]), status
    settings = state_of(adapter.app).settings
    assert checkpoints.load_newest(settings.model_dir).version == 2


def test_the_report_takes_epsilon_from_the_newest_entry_up_to_the_checkpoint():
    entries = [
        {"version": 0, "round": None, "epsilon": 0.0, "delta": 0.01},
        {"version": 1, "round": 1, "epsilon": 2.5, "delta": 0.01},
        {"version": 2, "round": 2, "epsilon": 3.25, "delta": 0.01},
    ]
    got = privacy_of(entries, 1)
    assert got == {"epsilon": 2.5, "delta": 0.01, "round": 1, "version": 1}
    assert privacy_line(got) == "privacy: ε = 2.500 at δ = 0.01 after round 1 (version 1)"
    assert privacy_of([{"version": 3, "round": 3, "accuracy": 0.9}], 3) is None  # no DP


# --- resuming: epsilon of a version scored after a restart, and what a resume refuses --------


def rounds_then_checkpoint(make_app, rounds: int, **overrides: object):
    """An app that closed `rounds` rounds and wrote its checkpoint (then is dropped, as if
    killed before anything else happened)."""
    app = make_app(**{**DP, "ROUNDS": 3, **overrides})
    client = app.test_client()
    for _ in range(rounds):
        one_round(client)
    state_of(app).save_if_due(force=True)
    assert checkpoints.versions(state_of(app).settings.model_dir)[0] == rounds
    return app


def test_a_version_scored_after_a_restart_reports_the_epsilon_of_its_rounds(make_app):
    # Prepare: the last of 2 rounds closes, its checkpoint is written, and the aggregator is
    # killed before a worker scores that version.
    rounds_then_checkpoint(make_app, 2, ROUNDS=2)
    # Execute: a new aggregator on the same MODEL_DIR; a worker scores the version now.
    client = make_app(**DP, ROUNDS=2).test_client()
    task = ask(client)["task"]
    assert task["kind"] == "evaluate"
    entry = score(client, task)
    # Assert: epsilon after the 2 rounds that made version 2, in the entry and in the report.
    expected = composed_epsilon(10, 2, 1.0, 2, 1 / 10**1.1)
    assert entry["version"] == 2 and entry["epsilon"] == pytest.approx(expected, rel=1e-5)
    history = client.get("/v1/history").get_json()["history"]
    assert privacy_of(history, 2)["epsilon"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("before", "after", "reason"),
    [
        ({"DP": "off"}, {}, "its 2 rounds have no record of being made under DP"),
        ({}, {"DP": "off"}, "its 2 rounds were made under DP=central: resuming with DP=off"),
        ({}, {"DP_NOISE": 2}, "other DP settings (DP_NOISE was 1.0, now 2.0)"),
        ({}, {"CLIENTS_PER_ROUND": 3}, "other DP settings (CLIENTS_PER_ROUND was 2, now 3)"),
        ({}, {"DP_DELTA": 0.001}, "other DP settings (DP_DELTA was 0.0794"),
        (
            {},
            {"DP_CLIP_AT": "aggregator", **ADAPTIVE},
            "other DP settings (DP_CLIP_AT was 'worker', now 'aggregator'; DP_CLIP_QUANTILE was "
            "0.0, now 0.5)",
        ),
        ({}, {"ROUNDS": 1}, "its 2 rounds released already took epsilon to "),
    ],
)
def test_a_checkpoint_made_with_other_dp_settings_is_refused_in_one_line(
    make_app, make_settings, before, after, reason
):
    # Prepare: 2 rounds closed and saved under `before`.
    app = rounds_then_checkpoint(make_app, 2, **before)
    path = checkpoints.path_for(state_of(app).settings.model_dir, 2)
    # Execute: resume under `after`.
    with pytest.raises(StartupError) as refused:
        State.resume(make_settings(**{"MODEL": "mlp", **DP, "ROUNDS": 3, **after}))
    # Assert: why, and how to reset, in one line; nothing changed on disk.
    text = str(refused.value)
    assert text.startswith(f"checkpoint {path}: "), text
    assert reason in text and "reset with `docker compose down -v`" in text
    assert "\n" not in text
    assert checkpoints.versions(path.parent)[0] == 2


def test_a_lower_budget_than_the_rounds_released_is_refused_not_clamped(make_app, make_settings):
    rounds_then_checkpoint(make_app, 2)
    delta = 1 / 10**1.1
    budget = (composed_epsilon(10, 2, 1.0, 1, delta) + composed_epsilon(10, 2, 1.0, 2, delta)) / 2
    with pytest.raises(StartupError) as refused:
        State.resume(make_settings(**{"MODEL": "mlp", **DP, "ROUNDS": 3}, DP_EPSILON_BUDGET=budget))
    assert f"more rounds than DP_EPSILON_BUDGET={budget:g} allows 1" in str(refused.value)


def test_the_same_dp_settings_resume_with_the_rounds_done(make_app, make_settings):
    rounds_then_checkpoint(make_app, 2)
    state = State.resume(make_settings(**{"MODEL": "mlp", **DP, "ROUNDS": 3}))
    assert state.queue.rounds_done == 2
    assert state.stages.state_dict()["dp"]["params"] == dp.params_of(state.settings)


# --- the central noise's key -------------------------------------------------------------


def test_the_noise_key_is_made_once_mode_0600_and_never_served(make_app, make_settings):
    # Prepare / execute: an aggregator starts, closes a round; another starts on the same dir.
    app = make_app(**DP, ROUNDS=2)
    key_file = state_of(app).settings.model_dir / dp.KEY_FILE
    key = key_file.read_text()
    client = app.test_client()
    one_round(client)
    make_app(**DP, ROUNDS=2)
    # Assert: 64 hex digits, owner-only from creation, kept, and in no response.
    assert len(key.strip()) == 64 and key_file.stat().st_mode & 0o777 == 0o600
    assert key_file.read_text() == key
    for path in ("/v1/status", "/v1/history", "/metrics"):
        assert key.strip() not in client.get(path).get_data(as_text=True)


def test_a_key_file_that_is_not_a_key_stops_the_start(make_app, make_settings):
    settings = make_settings(**{"MODEL": "mlp", **DP})
    settings.model_dir.mkdir(parents=True)
    (settings.model_dir / dp.KEY_FILE).write_text("not a key\n")
    write_v0(settings.model_dir)
    write_plan(settings)
    with pytest.raises(StartupError, match=r"dp\.key is not a key \(64 hex digits\)"):
        State.resume(settings)


# --- a refused round -----------------------------------------------------------------------


def test_a_refused_round_counts_in_epsilon_fires_the_budget_stop_and_keeps_the_clip_norm(
    make_app, make_settings
):
    # Prepare: version 0 a hair under MAX_WEIGHT, so the round's noise takes weights past it
    # and the aggregate is refused; adaptive clipping; the budget allows one round of 3.
    top = pipeline.MAX_WEIGHT - 0.1
    write_v0(make_settings().model_dir, fill=top)
    delta = 1 / 10**1.1
    budget = (composed_epsilon(10, 2, 1.0, 1, delta) + composed_epsilon(10, 2, 1.0, 2, delta)) / 2
    app = make_app(**DP, **ADAPTIVE, ROUNDS=3, DP_EPSILON_BUDGET=budget)
    state = state_of(app)
    client = app.test_client()
    # Execute: both updates unchanged from version 0 (within the clip norm).
    one_round(client, fills=(top, top))
    # Assert: no version; the norm is where it was; epsilon counts the round; the stop is said.
    status = client.get("/v1/status").get_json()
    assert status["version"] == 0 and status["round"]["rounds_done"] == 1, status
    assert any(e["text"].startswith("round 1 refused") for e in status["events"]), status
    assert state.stages.state_dict()["dp"]["clip_norm"] == 1.0
    expected = composed_epsilon(10, 2, 1.0, 1, delta)
    assert status["privacy"]["epsilon"] == pytest.approx(expected, rel=1e-5)
    metrics = client.get("/metrics").get_data(as_text=True)
    line = next(x for x in metrics.splitlines() if x.startswith("fedsim_dp_epsilon "))
    assert float(line.split()[1]) == pytest.approx(expected, rel=1e-5)
    assert any(
        e["kind"] == "finished" and "privacy budget" in e["text"] for e in status["events"]
    ), status
