"""POST /v1/dropouts (a worker gives back a task its client dropped) and the population in
/v1/status, through Flask's test client with a fake clock."""

from __future__ import annotations

import pytest
from flask.testing import FlaskClient

from helpers import TYPED_TOKEN, answer, ask, bearer, post, state_of, upload

ROUND = {"AGGREGATION": "fedavg", "PARTITION": "iid", "NUM_CLIENTS": 4, "CLIENTS_PER_ROUND": 2}
POPULATION = {"CLIENT_SPEED": "uniform:1,4", "CLIENT_BANDWIDTH": "1e6", "DROPOUT": "0.2"}


@pytest.fixture
def client(make_app) -> FlaskClient:
    return make_app(**ROUND, **POPULATION).test_client()


def train_task(client: FlaskClient, worker: str = "wk-1") -> dict:
    task = ask(client, worker)["task"]
    if task["kind"] == "evaluate":  # version 0 is scored first
        task = ask(client, worker)["task"]
    assert task["kind"] == "train"
    return task


def give_back(client: FlaskClient, task: dict, worker: str = "wk-1", **headers: str):
    body = {"worker": worker, "task": task["id"], "lease": task["lease"]}
    return client.post("/v1/dropouts", json=body, headers=headers or None)


def test_a_task_carries_its_clients_profile(client: FlaskClient) -> None:
    task = train_task(client)
    profile = task["profile"]
    assert 1 <= profile["speed"] <= 4 and profile["bandwidth"] == 1e6
    assert profile | {"speed": 0} == {
        "speed": 0, "bandwidth": 1e6, "dropout": 0.2, "dropout_mode": "abort", "clock": "real",
        "time_scale": 1.0,
    }  # fmt: skip
    assert "attempt" not in task


def test_a_given_back_task_goes_to_the_next_worker_as_a_new_attempt(client: FlaskClient) -> None:
    task = train_task(client)
    response = give_back(client, task)
    assert response.status_code == 200
    assert response.get_json() == {"given_back": True, "task": task["id"], "attempt": 0}
    again = train_task(client, "wk-2")
    assert (again["id"], again["attempt"]) == (task["id"], 1)
    status = client.get("/v1/status").get_json()
    row = next(c for c in status["clients"] if c["id"] == task["client"])
    assert row["dropouts"] == 1 and row["dropout"] == 0.2
    assert any(
        e["kind"] == "dropout" and f"dropped task {task['id']}" in e["text"]
        for e in status["events"]
    )


def test_a_give_back_under_a_lease_that_ran_out_is_refused(client: FlaskClient, clock) -> None:
    task = train_task(client)
    clock.advance(301)  # TASK_TIMEOUT
    train_task(client, "wk-2")
    response = give_back(client, task)
    assert response.status_code == 409
    assert response.get_json()["error"] == "not_held"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"worker": "wk-1", "task": "r1.c1"}, 400, "bad_task"),
        ({"worker": "wk-1", "task": "r1.c1", "lease": "zz"}, 400, "bad_task"),
        ({"task": "r1.c1", "lease": "ab"}, 400, "bad_worker"),
        ({"worker": "wk-1", "task": "r1.c1", "lease": "ab" * 32}, 409, "not_leased"),
        (
            {"worker": "wk-1", "task": "r1.c1", "lease": "ab" * 32, "diverged": ""},
            400,
            "bad_dropout",
        ),
    ],
)
def test_a_bad_give_back_is_refused_and_changes_nothing(
    client: FlaskClient, body: dict, status: int, code: str
) -> None:
    task = train_task(client)
    response = client.post("/v1/dropouts", json=body)
    assert (response.status_code, response.get_json()["error"]) == (status, code)
    state = state_of(client.application)
    assert state.queue.leases[task["id"]].token == task["lease"] and state.queue.stopped is None


def test_only_a_workers_token_may_give_back(client: FlaskClient) -> None:
    task = train_task(client)
    response = give_back(client, task, **bearer(TYPED_TOKEN))
    assert response.status_code == 403
    assert client.post("/v1/dropouts", data="[", headers={"Content-Type": "x"}).status_code == 400


def test_status_carries_the_populations_summary(client: FlaskClient) -> None:
    status = client.get("/v1/status").get_json()
    population = status["population"]
    assert population["client_speed"] == "uniform:1,4" and population["dropout"] == 0.2
    assert population["clients"] == 4 and population["bandwidth"]["max"] == 1e6
    speeds = [c["speed"] for c in status["clients"]]
    assert population["speed"]["max"] == max(speeds) and population["speed"]["min"] == min(speeds)


def test_equal_clients_show_speed_1_unlimited_bandwidth_no_dropout(make_app) -> None:
    status = make_app().test_client().get("/v1/status").get_json()
    assert all(
        (c["speed"], c["bandwidth"], c["dropout"], c["dropouts"]) == (1.0, None, 0.0, 0)
        for c in status["clients"]
    )
    assert status["population"]["bandwidth"] is None


def test_a_diverged_training_stops_the_run_at_the_served_version(make_app) -> None:
    client = make_app(**ROUND).test_client()
    score = ask(client, "wk-1")["task"]  # version 0 is scored first
    first, second = train_task(client, "wk-2"), train_task(client, "wk-3")
    body = {"worker": "wk-2", "task": first["id"], "lease": first["lease"]}
    response = client.post("/v1/dropouts", json={**body, "diverged": "non-finite weights in a"})
    assert response.status_code == 200
    reason = response.get_json()["stopped"]
    assert reason.startswith(f"{first['client']}'s training in task {first['id']} on ")
    assert "diverged (non-finite weights in a); the run stops at version 0" in reason

    # The round's other update is refused, no training is handed out, and the run is
    # finished once the served version has its score.
    late = post(client, answer(second, 1.0))
    assert late.status_code == 409 and late.get_json()["error"] == "finished"
    offer = ask(client, "wk-4")
    assert offer["task"] is None and not offer["finished"]
    status = client.get("/v1/status").get_json()
    assert status["stopped"] == reason and not status["finished"]
    assert any(e["kind"] == "finished" and reason in e["text"] for e in status["events"])
    scored = {"worker": "wk-1", "task": score["id"], "lease": score["lease"]}
    assert (
        client.post("/v1/evaluations", json={**scored, "accuracy": 0.1, "loss": 2.3}).status_code
        == 200
    )
    assert ask(client, "wk-4")["finished"]
    assert client.get("/v1/status").get_json()["version"] == 0


def test_an_asynchronous_run_stopped_scores_its_last_version_and_takes_no_update(make_app):
    client = make_app(**{**ROUND, "AGGREGATION": "async-weighted"}).test_client()
    score = ask(client, "wk-1")["task"]
    scored = {"worker": "wk-1", "task": score["id"], "lease": score["lease"]}
    assert (
        client.post("/v1/evaluations", json={**scored, "accuracy": 0.1, "loss": 2.3}).status_code
        == 200
    )
    first, second = train_task(client, "wk-2"), train_task(client, "wk-3")
    assert post(client, answer(first, 1.0)).status_code == 200  # v1: EVAL_EVERY=2 skips it
    body = {"worker": "wk-3", "task": second["id"], "lease": second["lease"]}
    stopped = client.post("/v1/dropouts", json={**body, "diverged": "non-finite weights in a"})
    assert "the run stops at version 1" in stopped.get_json()["stopped"]

    last = ask(client, "wk-2")["task"]  # the version it stopped at is scored after all
    assert (last["kind"], last["version"]) == ("evaluate", 1)
    typed = upload(1.0, client_id="typed", num_samples=100)  # a hand-started client's
    late = post(client, typed, headers=bearer(TYPED_TOKEN))
    assert late.status_code == 409 and late.get_json()["error"] == "finished"
    assert client.get("/v1/status").get_json()["version"] == 1
