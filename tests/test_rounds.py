"""Rounds (aggregator/tasks/rounds.py) and tasks through the API: over-selection, deadlines
and retries, availability, resuming mid-round; the rules' math, rounds that hand out their
sampled clients and close, leases, deadlines and restarts, the evaluations waiting for a
score, and what a review of the rules and the queue found."""

from __future__ import annotations

import numpy as np
import pytest
from flask.testing import FlaskClient

from fedsim import weights
from fedsim.aggregator import tasks
from fedsim.aggregator.strategies import Refused
from fedsim.aggregator.tasks import deadlines, ids
from fedsim.data.population import Population
from fedsim.protocol import TrainTask
from helpers import (
    ROUNDS,
    FakeClock,
    answer,
    ask,
    lookup,
    model_dir,
    post,
    served,
    state_of,
    upload,
)

PLAN = {"PARTITION": "iid", "SEED": 7, "NUM_CLIENTS": 10}
TRAINING = {"model": "mlp", "epochs": 1, "batch_size": 10, "learning_rate": 0.1, "optimizer": "sgd"}


def round_queue(clock: FakeClock, n: int = 10, **kw) -> tasks.RoundQueue:
    """A RoundQueue of n clients (100 images each), 2 per round unless told, seed 7."""
    common = {
        "seed": 7,
        "per_round": 2,
        "rounds": 3,
        "task_timeout": 30.0,
        "training": TRAINING,
        "partition": PLAN,
        "clock": clock,
        "run_clock": clock,  # the run's clock reads the fake one as it is
        "wall": lambda: 1.7e9,
        "quorum": 2,
        "key": b"k" * 32,  # the same lease key across a restart
    }
    clients = [tasks.Client(c, 100, f"h{c}") for c in range(1, n + 1)]
    return tasks.RoundQueue(clients, **{**common, **kw})


def hand_out(q: tasks.RoundQueue, version: int = 0) -> list[TrainTask]:
    """Every task of the open attempt, each to its own worker."""
    out = []
    while True:
        offer, _ = q.ask(f"w{len(out)}", version)
        if offer.task is None:
            return out
        assert isinstance(offer.task, TrainTask)
        out.append(offer.task)


def arrive(q: tasks.RoundQueue, task: TrainTask, now: float, version: int = 0) -> None:
    """`task`'s update reaches the queue at `now`, as the state puts it in."""
    assert q.check_update(task.id, task.lease, task.client, version, version, 1) is True
    q.add_update(task.id, task.id, now)
    q.record_update(task.id, task.lease)


def test_a_rounds_attempt_is_in_its_task_id_with_one_spelling() -> None:
    assert ids.round_task(3, 17) == "r3.c17" and ids.parse_attempt("r3.c17") == (3, 1, 17)
    assert ids.round_task(3, 17, 2) == "r3a2.c17" and ids.parse_attempt("r3a2.c17") == (3, 2, 17)
    for other in ("r3a1.c17", "r3a0.c17", "r3a02.c17", "r3a.c17"):
        assert ids.parse_attempt(other) is None and not ids.is_task(other)


# --- over-selection: ask K = ceil(OVERSELECT x C), close at the first C -----------------------


def test_over_selection_asks_more_and_closes_at_the_first_c_arrivals() -> None:
    clock = FakeClock()
    q = round_queue(clock, per_round=4, overselect=1.3)  # ceil(1.3 x 4) = ceil(5.2) = 6
    given = hand_out(q)
    assert [t.client_number for t in given] == ids.sample(7, 1, 6, 10)
    for t in given[:3]:
        arrive(q, t, clock())
    assert q.due(clock()) is None
    arrive(q, given[3], clock())
    assert q.due(clock()) == "first 4 arrivals"
    closed = q.close("first 4 arrivals")
    assert sorted(closed.updates) == sorted(t.client_number for t in given[:4])
    assert q.leases == {}  # the other two are cancelled
    late = given[4]
    with pytest.raises(Refused) as refused:
        q.check_update(late.id, late.lease, late.client, 0, 1, 1)
    assert refused.value.status == 409 and refused.value.code == "round_closed"
    assert str(refused.value) == (
        f"round 1 closed with its first 4 arrivals; the result of task {late.id} is not counted"
    )


def test_overselect_of_one_samples_as_before_and_a_float_product_is_not_rounded_up() -> None:
    assert round_queue(FakeClock(), per_round=10, n=20, overselect=1.1).asked == 11
    q = round_queue(FakeClock(), per_round=3)
    assert [t.client_number for t in hand_out(q)] == ids.sample(7, 1, 3, 10)


def test_over_selection_through_the_api_refuses_the_late_result_with_409(make_app) -> None:
    client = make_app(**ROUNDS, ROUNDS=3, OVERSELECT=1.5).test_client()  # asks 3, keeps 2
    ask(client)  # the evaluation of version 0
    a, b, c = (ask(client, f"wk-{i}")["task"] for i in range(3))
    assert len({a["client"], b["client"], c["client"]}) == 3
    post(client, answer(a, 1.0))
    assert post(client, answer(b, 3.0)).get_json()["version"] == 1
    before = served(client)
    late = post(client, answer(c, 9.0))
    assert late.status_code == 409 and late.get_json()["error"] == "round_closed"
    assert late.get_json()["detail"].startswith("round 1 closed with its first 2 arrivals")
    assert served(client) == before


# --- the deadline: close with a quorum, or retry with a new sample ----------------------------


def test_the_deadline_closes_a_round_that_has_its_quorum() -> None:
    clock = FakeClock()
    q = round_queue(clock, per_round=3, quorum=2, deadline=60.0)
    given = hand_out(q)
    arrive(q, given[0], clock() + 5)
    arrive(q, given[1], clock() + 10)
    clock.advance(59.9)
    assert q.due(clock()) is None
    clock.advance(0.1)
    assert q.due(clock()) == "deadline"
    assert len(q.close("deadline").updates) == 2 and q.rounds_done == 1
    assert q.closed["1"] == "round 1 closed at its deadline with 2 arrivals"


def test_the_deadline_retries_a_round_without_its_quorum_with_a_new_sample() -> None:
    clock = FakeClock()
    q = round_queue(clock, per_round=3, quorum=2, deadline=60.0)
    first = hand_out(q)
    arrive(q, first[0], clock() + 1)
    clock.advance(60)
    assert q.due(clock()) == tasks.RETRY
    failed = q.retry(clock())
    assert (failed.number, failed.attempt, len(failed.updates)) == (1, 1, 1)
    r = q.round
    assert r is not None and (r.number, r.attempt, r.opened_at) == (1, 2, clock())
    assert r.sampled == ids.sample(7, 1, 3, 10, attempt=2) and not r.updates
    assert q.rounds_done == 0 and q.leases == {}  # nothing published, the old leases revoked
    second = hand_out(q)
    assert {t.id for t in second} == {f"r1a2.c{n}" for n in r.sampled}
    assert {t.seed for t in second}.isdisjoint({t.seed for t in first})
    with pytest.raises(Refused) as refused:  # the failed attempt's straggler
        q.check_update(first[1].id, first[1].lease, first[1].client, 0, 0, 1)
    assert refused.value.code == "round_closed" and "attempt 1 reached its deadline with 1 of" in (
        str(refused.value)
    )


def test_a_round_retried_through_the_api_publishes_nothing_and_says_so(make_app, clock) -> None:
    client = make_app(**ROUNDS, ROUNDS=3, ROUND_DEADLINE=30, MIN_CLIENTS=2).test_client()
    ask(client)
    a = ask(client)["task"]
    ask(client, "wk-2")  # never answered
    post(client, answer(a, 5.0))
    clock.advance(30)
    status = client.get("/v1/status").get_json()
    assert status["version"] == 0 and status["round"]["attempt"] == 2
    assert status["round"]["number"] == 1 and status["round"]["pending"] == 0
    text = status["events"][-1]["text"]
    assert text.startswith("round 1 attempt 1: 1 of the 2 updates it needs by its deadline")
    retried = ask(client)["task"]
    assert retried["id"].startswith("r1a2.c") and retried["round"] == 1
    late = post(client, answer(a, 5.0))  # the failed attempt's update is not counted
    assert late.status_code == 409 and late.get_json()["error"] == "round_closed"
    assert client.get("/v1/status").get_json()["round"]["pending"] == 0


# --- auto: D = median + 3 x 1.4826 x MAD of the recent arrivals ------------------------------


def test_the_auto_deadline_on_hand_worked_arrivals() -> None:
    # Arrivals 10, 12, 14, 30 and 11: median 12; |x - 12| = 2, 0, 2, 18, 1 -> MAD 2;
    # D = 12 + 3 x 1.4826 x 2 = 20.8956.
    assert deadlines.auto([[10.0, 12.0, 14.0], [30.0, 11.0]], 99.0) == pytest.approx(20.8956)
    assert deadlines.auto([[5.0, 5.0, 5.0]], 99.0) == 5.0  # MAD 0: the median
    assert deadlines.auto([[0.0, 0.0]], 99.0) == 1.0  # never under AUTO_FLOOR: no round meets 0
    assert deadlines.auto([], 99.0) == 99.0  # the first round: the fallback, TASK_TIMEOUT


def test_the_auto_deadline_learns_from_closed_rounds_and_doubles_per_attempt() -> None:
    clock = FakeClock()
    q = round_queue(clock, per_round=3, quorum=3, deadline="auto")
    assert q.deadline_seconds() == 30.0  # no history yet: TASK_TIMEOUT
    given = hand_out(q)
    for t, after in zip(given, (10.0, 12.0, 14.0), strict=True):
        arrive(q, t, clock() + after)
    q.close("all sampled clients")
    assert q.recent == [[10.0, 12.0, 14.0]]
    hand_out(q, version=1)
    assert q.deadline_seconds() == pytest.approx(12 + 3 * 1.4826 * 2)
    clock.advance(q.deadline_seconds())
    assert q.due(clock()) == tasks.RETRY
    q.retry(clock())
    assert q.deadline_seconds() == pytest.approx(2 * (12 + 3 * 1.4826 * 2))


# --- availability: who is offline when a round opens is not asked -----------------------------


def test_an_offline_client_is_not_sampled(tmp_path) -> None:
    trace = tmp_path / "trace.csv"
    # Clients 1-6 online for the first 100 s; 7-10 only from 100 s on.
    trace.write_text(
        "client,start,end\n"
        + "".join(f"client-{c},0,100\n" for c in range(1, 7))
        + "".join(f"client-{c},100,1000\n" for c in range(7, 11))
    )
    ids_ = [f"client-{c}" for c in range(1, 11)]
    pop = Population.build({"SEED": 7, "AVAILABILITY": f"trace:{trace}"}, ids_)
    clock = FakeClock(start=0.0)
    q = round_queue(clock, per_round=4, quorum=4, online=lambda n, t: pop.online(f"client-{n}", t))
    early = [t.client_number for t in hand_out(q)]
    assert early == ids.sample(7, 1, 4, 10, online=range(1, 7))  # seeded among the online
    # Round 1 is retried at 150 s, when only clients 7-10 are online.
    clock.advance(150)
    q.retry(clock())
    assert q.round is not None and q.round.sampled == [7, 8, 9, 10]


# --- resuming mid-round ------------------------------------------------------------------------


def test_resume_mid_round_keeps_the_attempt_and_its_sample() -> None:
    clock = FakeClock()
    q = round_queue(clock, per_round=3, quorum=2, deadline=60.0)
    first = hand_out(q)
    clock.advance(60)
    q.retry(clock())
    second = hand_out(q)
    saved = q.state_dict()
    assert saved["open"] == {
        "round": 1, "attempt": 2, "sampled": q.round.sampled, "opened_at": clock()
    }  # fmt: skip
    again = round_queue(clock, per_round=3, quorum=2, deadline=60.0)
    again.load_state_dict(saved)
    r = again.open_round(0, clock())
    assert r is not None and (r.number, r.attempt, r.sampled) == (1, 2, q.round.sampled)
    assert r.opened_at == clock()  # its deadline counts from the same opening
    # A worker's result pushed again after the restart counts; the old attempt's does not.
    task = second[0]
    assert again.check_update(task.id, task.lease, task.client, 0, 0, 1) is True
    with pytest.raises(Refused) as refused:
        again.check_update(first[0].id, first[0].lease, first[0].client, 0, 0, 1)
    assert refused.value.code == "round_closed"


def test_a_bad_saved_round_state_is_refused() -> None:
    q = round_queue(FakeClock())
    for bad, why in (
        ({"arrivals": [[-1.0]]}, "bad arrivals"),
        ({"arrivals": "x"}, "bad arrivals"),
        ({"open": {"round": 1, "attempt": 0, "sampled": [1]}}, "bad open round attempt"),
        ({"open": {"round": 1, "attempt": 2, "sampled": [99]}}, "bad open round sample"),
        ({"closed": {"1": 3}}, "bad closed rounds"),
        ({"open": {"round": 1, "attempt": 1, "sampled": [1], "opened_at": -2}}, "bad open round"),
    ):
        with pytest.raises(ValueError, match=why):
            q.load_state_dict(bad)


def test_resume_mid_round_through_the_api_keeps_the_attempt(make_app, clock) -> None:
    rule = {**ROUNDS, "ROUNDS": 3, "ROUND_DEADLINE": 30, "MIN_CLIENTS": 2, "SAVE_MODEL": 1}
    client = make_app(**rule).test_client()
    ask(client)
    a = ask(client)["task"]
    post(client, answer(a, 5.0))
    clock.advance(30)
    task = ask(client)["task"]
    assert task["id"].startswith("r1a2.")
    state_of(client.application).save_if_due(force=True)
    again = make_app(**rule).test_client()
    assert again.get("/v1/status").get_json()["round"]["attempt"] == 2
    assert post(again, answer(task, 1.0)).get_json()["duplicate"] is False


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


def test_a_version_scored_after_a_restart_keeps_its_round_and_clients(make_app) -> None:
    # Prepare: round 1 closes with two clients and v1 waits for its score; a checkpoint.
    app = make_app(**ROUNDS, ROUNDS=3, SAVE_MODEL=1)
    client = app.test_client()
    ask(client)  # the score of v0, left unanswered
    a, b = ask(client)["task"], ask(client)["task"]
    post(client, answer(a, 1.0))
    post(client, answer(b, 1.0))
    # Execute: a restart, then v1's score.
    again = make_app(**ROUNDS, ROUNDS=3, SAVE_MODEL=1).test_client()
    task = ask(again, "wk-2")["task"]
    assert task["id"] == "eval.v1"
    body = {"worker": "wk-2", "task": task["id"], "lease": task["lease"]}
    assert (
        again.post("/v1/evaluations", json={**body, "accuracy": 0.5, "loss": 1.0}).status_code
        == 200
    )
    # Assert: the entry says what it would have said without the restart.
    entry = again.get("/v1/history").get_json()["history"][-1]
    assert (entry["version"], entry["round"]) == (1, 1)
    assert entry["clients"] == sorted({a["client"], b["client"]})


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
