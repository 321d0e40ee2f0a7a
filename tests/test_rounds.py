"""Tasks and rounds through the API: the rules' math, rounds that hand out their sampled
clients and close, leases, timeouts and restarts, the evaluations waiting for a score, and
what a review of the rules and the queue found."""

from __future__ import annotations

import numpy as np
import pytest
from flask.testing import FlaskClient

from fedsim import weights
from helpers import ROUNDS, answer, ask, lookup, model_dir, post, served, state_of, upload

# --- the rules' math through the API --------------------------------------------------


def test_async_weighted_update_math_through_the_api(client: FlaskClient) -> None:
    # Prepare: version 0 is all zeros with 0 samples.
    # Execute: 100 samples of 2.0, then 300 samples of 5.0.
    first = post(client, upload(2.0, num_samples=100))
    second = post(client, upload(5.0, num_samples=300, client_id="client-2", base_version=0))
    # Assert: v1 = 2.0 (a = 0), v2 = (100*2 + 300*5) / 400 = 4.25.
    assert first.get_json() == {"accepted": True, "version": 1, "duplicate": False, "seq": 1}
    assert second.get_json() == {"accepted": True, "version": 2, "duplicate": False, "seq": 2}
    got, meta = weights.decode(client.get("/v1/model").data)
    assert meta["version"] == "2" and meta["samples"] == "400"
    for tensor in got.values():
        np.testing.assert_allclose(tensor, 4.25, rtol=1e-6)


def test_fedasync_update_math_through_the_api_and_resume(make_app, make_settings) -> None:
    # Prepare: version 0 is all zeros; alpha = 0.5, a = 0.5, a checkpoint per update.
    settings = {"AGGREGATION": "fedasync", "FEDASYNC_ALPHA": 0.5, "FEDASYNC_STALENESS": 0.5}
    client = make_app(SAVE_MODEL=1, **settings).test_client()
    # Execute: a fresh update of 2.0, then an update of 4.0 still based on version 0.
    first = post(client, upload(2.0, num_samples=100))
    second = post(client, upload(4.0, num_samples=300, client_id="client-2", base_version=0))
    # Assert: v1 = 0.5 * 2 = 1 (t - tau = 0); v2: t - tau = 1, alpha_t = 0.5 / sqrt(2).
    assert first.get_json() == {"accepted": True, "version": 1, "duplicate": False, "seq": 1}
    assert second.get_json() == {"accepted": True, "version": 2, "duplicate": False, "seq": 2}
    expected = 1.0 + 0.5 / np.sqrt(2.0) * (4.0 - 1.0)
    got, meta = weights.decode(client.get("/v1/model").data)
    assert meta["version"] == "2" and meta["samples"] == "400"
    for tensor in got.values():
        np.testing.assert_allclose(tensor, expected, rtol=1e-6)
    status = client.get("/v1/status").get_json()
    assert status["strategy"] == "fedasync" and status["round"] is None
    # A restarted aggregator resumes at version 2, so staleness keeps counting from there.
    again = make_app(SAVE_MODEL=1, **settings).test_client()
    third = post(again, upload(0.0, num_samples=100, base_version=2))
    assert third.get_json()["version"] == 3
    got, _ = weights.decode(again.get("/v1/model").data)
    for tensor in got.values():
        np.testing.assert_allclose(tensor, expected / 2, rtol=1e-6)


# --- tasks and rounds through the API -------------------------------------------------


def test_a_round_hands_out_its_sampled_clients_then_closes_with_their_mean(make_app) -> None:
    client = make_app(**ROUNDS, ROUNDS=3).test_client()
    evaluation = ask(client)["task"]
    assert evaluation["kind"] == "evaluate" and evaluation["version"] == 0  # scored first
    a, b = ask(client)["task"], ask(client, "wk-2")["task"]
    assert a["kind"] == b["kind"] == "train" and a["round"] == b["round"] == 1
    assert a["id"] == f"r1.c{a['client'].split('-')[1]}" and a["client"] != b["client"]
    assert a["train"]["epochs"] == 5 and a["partition"]["PARTITION"] == "iid"
    idle = ask(client, "wk-3")
    assert idle["task"] is None and not idle["finished"] and "round 1" in idle["reason"]
    # The first update waits in the round; a retry of it is acknowledged, not counted.
    first = post(client, answer(a, 1.0, num_samples=100))
    assert first.get_json() == {"accepted": True, "version": 0, "duplicate": False, "seq": None}
    assert post(client, answer(a, 1.0, num_samples=100)).get_json()["duplicate"] is True
    assert client.get(f"/v1/updates/{a['id']}").get_json()["state"] == "pending"
    # The second closes it: (100 * 1 + 300 * 5) / 400 = 4.
    assert post(client, answer(b, 5.0, num_samples=300)).get_json()["version"] == 1
    got, _ = weights.decode(client.get("/v1/model").data)
    np.testing.assert_allclose(got["output/bias"], 4.0, rtol=1e-6)
    status = client.get("/v1/status").get_json()
    assert status["round"]["rounds_done"] == 1 and status["round"]["number"] == 2
    assert status["mode"] == "rounds"
    assert any("round 1 closed" in e["text"] for e in status["events"])
    # Round 1's model is scored next, before round 2's tasks.
    assert ask(client)["task"]["id"] == "eval.v1"


def test_the_same_seed_samples_the_same_clients_whatever_the_workers(make_app) -> None:
    def clients_of_round_one(workers: int) -> list[str]:
        client = make_app(
            **ROUNDS, ROUNDS=2, MODEL_DIR=f"/tmp/fedsim-test-{workers}-{id(make_app)}"
        ).test_client()
        got = []
        for i in range(4):
            task = ask(client, f"wk-{i % workers}")["task"]
            if task and task["kind"] == "train":
                got.append(task["client"])
        return sorted(got)

    assert clients_of_round_one(1) == clients_of_round_one(3)


def test_stale_and_finished_updates_are_409_and_change_nothing(make_app) -> None:
    client = make_app(**ROUNDS, ROUNDS=1, SAVE_MODEL=5).test_client()
    v0 = ask(client)["task"]  # the evaluation of version 0
    a, b = ask(client)["task"], ask(client)["task"]
    post(client, answer(a, 1.0))
    post(client, answer(b, 1.0))  # round 1 closes: version 1, the last round
    before = served(client)
    late = post(
        client, upload(2.0, client_id=a["client"], update_id="r1.cx", task="r1.cx", lease="ab")
    )
    assert late.status_code == 409 and late.get_json()["error"] == "not_leased"
    again = post(client, answer(a, 3.0))  # already counted: acknowledged
    assert again.status_code == 200 and again.get_json()["duplicate"] is True
    assert served(client) == before
    status = client.get("/v1/status").get_json()
    assert status["finished"] is False  # version 1 is not scored yet
    evaluation = ask(client)["task"]
    assert evaluation["id"] == "eval.v1"
    for task in (evaluation, v0):
        done = client.post(
            "/v1/evaluations",
            json={
                "worker": "wk-1",
                "task": task["id"],
                "lease": task["lease"],
                "accuracy": 0.9,
                "loss": 0.3,
            },
        )
        assert done.status_code == 200
    assert ask(client)["finished"] is True
    assert client.get("/v1/status").get_json()["finished"] is True


def test_a_round_closes_at_its_deadline_with_what_arrived(make_app, clock) -> None:
    app = make_app(**ROUNDS, ROUND_DEADLINE=30, ROUNDS=3)
    client = app.test_client()
    ask(client)
    a = ask(client)["task"]
    ask(client)  # b is handed out and never answered
    post(client, answer(a, 2.0))
    clock.advance(29)
    assert client.get("/healthz").get_json()["version"] == 0
    clock.advance(1)
    # A model download notices the deadline and closes the round first.
    assert client.get("/v1/model").headers["X-Fedsim-Version"] == "1"
    assert "(deadline)" in client.get("/v1/status").get_json()["events"][-1]["text"]


def test_an_expired_lease_goes_to_another_worker_and_the_late_result_is_refused(
    make_app, clock
) -> None:
    app = make_app(**ROUNDS, TASK_TIMEOUT=60, ROUNDS=3)
    client = app.test_client()
    ask(client)
    slow = ask(client, "slow")["task"]
    clock.advance(61)
    # Another worker asks: the expired task is handed out again, under a new lease.
    retaken = None
    for _ in range(3):
        task = ask(client, "fast")["task"]
        if task and task["id"] == slow["id"]:
            retaken = task
            break
    assert retaken is not None and retaken["lease"] != slow["lease"]
    before = served(client)
    late = post(client, answer(slow, 9.0))
    assert late.status_code == 409 and late.get_json()["error"] == "reassigned"
    assert "not counted" in late.get_json()["detail"]
    assert served(client) == before
    assert client.get("/v1/status").get_json()["pending_updates"] == 0
    assert post(client, answer(retaken, 1.0)).status_code == 200


def test_a_pending_update_lost_in_a_hard_kill_is_accepted_again(make_app) -> None:
    first = make_app(**ROUNDS, ROUNDS=3)
    client = first.test_client()
    ask(client)
    a = ask(client)["task"]
    assert post(client, answer(a, 2.0)).get_json()["duplicate"] is False
    # The restart forgets the open round; the same task's update counts once more.
    again = make_app(**ROUNDS, ROUNDS=3).test_client()
    assert again.get(f"/v1/updates/{a['id']}").status_code == 404
    assert post(again, answer(a, 2.0)).get_json()["duplicate"] is False
    assert again.get("/v1/status").get_json()["round"]["pending"] == 1


def test_rounds_and_slices_progress_survive_a_restart(make_app) -> None:
    app = make_app(**ROUNDS, ROUNDS=3, SAVE_MODEL=1)
    client = app.test_client()
    ask(client)
    a, b = ask(client)["task"], ask(client)["task"]
    post(client, answer(a, 1.0))
    post(client, answer(b, 1.0))
    again = make_app(**ROUNDS, ROUNDS=3, SAVE_MODEL=1).test_client()
    assert again.get("/v1/status").get_json()["round"]["rounds_done"] == 1
    assert again.get(f"/v1/updates/{a['id']}").get_json()["state"] == "saved"
    # Slices: a client's next slice after a restart is the one after its last saved one.
    app = make_app(SAVE_MODEL=1, MODEL_DIR=str(model_dir(app).parent / "slices"))
    client = app.test_client()
    ask(client)  # evaluation of v0
    task = ask(client)["task"]
    assert (task["id"], task["slice"], task["slices"]) == ("c1.s1", 1, "1-4")
    post(client, answer(task, 1.0))
    again = make_app(SAVE_MODEL=1, MODEL_DIR=str(model_dir(app))).test_client()
    assert ask(again)["task"]["id"] == "eval.v1"  # the restored version is scored first
    assert ask(again)["task"]["id"] == "c1.s2"


def test_a_task_update_is_checked_against_its_task(make_app) -> None:
    client = make_app(**ROUNDS, ROUNDS=3).test_client()
    ask(client)
    a = ask(client)["task"]
    before = served(client)
    too_many = post(client, answer(a, 1.0, num_samples=a["samples"] + 1))
    assert too_many.status_code == 422 and too_many.get_json()["error"] == "bad_num_samples"
    other = upload(1.0, client_id="client-99", update_id=a["id"], task=a["id"], lease=a["lease"])
    assert post(client, other).get_json()["error"] == "wrong_client"
    mismatch = upload(1.0, client_id=a["client"], update_id="x", task=a["id"], lease=a["lease"])
    assert post(client, mismatch).status_code == 400
    free = post(client, upload(1.0, client_id="typed"))
    assert free.status_code == 409 and free.get_json()["error"] == "no_task"
    assert served(client) == before


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/tasks", b"not json", 400, "bad_json"),
        ("/v1/tasks", b"[1]", 400, "bad_json"),
        ("/v1/tasks", b'{"worker": ""}', 400, "bad_worker"),
        ("/v1/tasks", '{"worker": "a\u2028b"}'.encode(), 400, "bad_worker"),
        ("/v1/tasks", b"[" * 5000, 413, "too_large"),
        ("/v1/workers", b"{}", 400, "bad_worker"),
        (
            "/v1/evaluations",
            b'{"worker": "w", "task": "eval.v0", "lease": "ab"}',
            400,
            "bad_metrics",
        ),
        (
            "/v1/evaluations",
            b'{"worker": "w", "task": "eval.v0", "lease": "ab", "accuracy": 2, "loss": 1}',
            400,
            "bad_metrics",
        ),
        (
            "/v1/evaluations",
            b'{"worker": "w", "task": "eval.v0", "lease": "ab", "accuracy": 0.5, "loss": 1}',
            409,
            "not_leased",
        ),
        (
            "/v1/evaluations",
            b'{"worker": "w", "task": "eval.v7", "lease": "ab", "accuracy": 0.5, "loss": 1}',
            409,
            "not_leased",
        ),
    ],
)
def test_bad_task_requests_are_4xx(client, path: str, body: bytes, status: int, code: str) -> None:
    ask(client)  # leases eval.v0 to wk-1
    response = client.post(path, data=body, content_type="application/json")
    assert response.status_code == status
    assert response.get_json()["error"] == code
    assert client.get("/v1/history").get_json() == {"history": []}


# --- evaluations ----------------------------------------------------------------------


def test_versions_waiting_for_a_score_are_bounded_in_memory(make_app, caplog) -> None:
    from fedsim.aggregator.evaluations import MAX_WAITING_EVALUATIONS

    client = make_app(EVAL_EVERY=1).test_client()
    for i in range(20):  # no worker scores anything
        post(client, upload(float(i), update_id=f"u{i}"))
    waiting = client.get("/v1/status").get_json()["evaluations_pending"]
    assert len(waiting) == MAX_WAITING_EVALUATIONS and waiting[-1] == 20
    assert len(state_of(client.application).evaluations.waiting) == MAX_WAITING_EVALUATIONS
    assert "evaluation of v0 skipped" in caplog.text
    assert client.get("/v1/model?version=1").status_code == 404


# --- what a review of the rules and the queue found -----------------------------------


def test_a_buffered_update_sent_twice_counts_once(make_app) -> None:
    client = make_app(AGGREGATION="fedbuff", FEDBUFF_K=5).test_client()
    body = upload(1.0, update_id="held-1", num_samples=10)
    assert post(client, body).get_json()["duplicate"] is False
    assert post(client, body).get_json()["duplicate"] is True
    status = client.get("/v1/status").get_json()
    assert status["pending_updates"] == 1 and status["version"] == 0
    assert lookup(client, "held-1").get_json()["state"] == "pending"


def test_another_rule_on_the_same_models_starts_its_work_afresh(make_app) -> None:
    first = make_app(SAVE_MODEL=1).test_client()
    ask(first)  # the evaluation of version 0
    task = ask(first)["task"]
    assert post(first, answer(task, 1.0)).status_code == 200
    # The same MODEL_DIR under fedasync: the model is kept, the task ids are this run's own.
    again = make_app(SAVE_MODEL=1, AGGREGATION="fedasync").test_client()
    ask(again)
    retaken = ask(again)["task"]
    assert retaken["id"] == task["id"]
    response = post(again, answer(retaken, 2.0))
    assert response.get_json()["duplicate"] is False
