"""SECAGG=true through the Flask test client: a round's phases as tasks, dropouts, an
abandoned attempt, a restart mid-phase, and what the aggregator keeps (no single update)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fedsim import weights
from fedsim.pipeline.secagg.stage import ensure_secret
from helpers import state_of
from helpers.secagg import SECAGG, Driver, value_of


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "workers" / "secagg.key"
    ensure_secret(path)
    return path


@pytest.fixture
def secagg_app(make_app, key_file):
    return lambda **kw: make_app(**{**SECAGG, "SECAGG_KEY_FILE": key_file, **kw})


def served_model(client) -> dict[str, np.ndarray]:
    return weights.decode(client.get("/v1/model").data)[0]


def expected_mean(clients: list[str]) -> float:
    return float(np.mean([value_of(c) for c in clients]))  # iid: equal counts


def test_five_clients_one_dropping_after_keys(secagg_app, key_file, clock, caplog) -> None:
    caplog.set_level(logging.INFO)
    app = secagg_app()
    client = app.test_client()
    sampled = state_of(app).queue.open_round(0).sampled  # type: ignore[attr-defined]
    gone = f"client-{sampled[0]}"
    driver = Driver(client, key_file, drop={(gone, "shares")})
    driver.run(clock)
    survivors = [f"client-{n}" for n in sampled[1:]]
    assert sorted(driver.sent) == sorted(survivors)  # the dropped client never trained
    model = served_model(client)
    assert state_of(app).snapshot.version == 1
    for tensor in model.values():
        assert np.allclose(tensor, expected_mean(survivors), atol=1e-6)
    assert "round 1 closed (secure aggregation, attempt 1): 4 of 5 clients masked in" in caplog.text


def test_a_client_dropping_after_its_training_task_is_recovered(
    secagg_app, key_file, clock
) -> None:
    app = secagg_app()
    client = app.test_client()
    sampled = state_of(app).queue.open_round(0).sampled  # type: ignore[attr-defined]
    gone = f"client-{sampled[2]}"
    driver = Driver(client, key_file, drop={(gone, "masked")})
    driver.run(clock)
    survivors = [f"client-{n}" for n in sampled if f"client-{n}" != gone]
    for tensor in served_model(client).values():
        assert np.allclose(tensor, expected_mean(survivors), atol=1e-6)
    status = client.get("/v1/status").get_json()
    last = status["secagg"]["rounds"][-1]
    assert (last["round"], last["masked_in"], last["recovered"]) == (1, 4, 1)
    assert last["protocol_bytes"] > 4 * 8 * 199_210  # four masked inputs of the mlp at least
    rows = {row["id"]: row for row in status["clients"]}
    assert all(rows[c]["secagg"] == "true" and rows[c]["loss"] is None for c in survivors)
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "fedsim_secagg_clients_masked_total 4.0" in metrics
    assert "fedsim_secagg_dropouts_recovered_total 1.0" in metrics
    assert "fedsim_secagg_protocol_seconds_count 1.0" in metrics
    # The aggregator's own time for the round counts its unmasking (the rebuilt masks).
    assert last["unmask_seconds"] > 0
    made = next(x for x in metrics.splitlines() if x.startswith("fedsim_aggregation_seconds_sum"))
    assert float(made.split()[1]) >= last["unmask_seconds"]
    assert "fedsim_aggregation_seconds_count 1.0" in metrics


def test_below_the_threshold_the_attempt_is_abandoned_and_nothing_published(
    secagg_app, key_file, clock, caplog
) -> None:
    app = secagg_app(SECAGG_THRESHOLD=5)
    client = app.test_client()
    queue = state_of(app).queue
    first = queue.open_round(0)  # type: ignore[attr-defined]
    nonce = queue.attempt.nonce  # type: ignore[attr-defined]
    gone = f"client-{first.sampled[1]}"
    driver = Driver(client, key_file, drop={(gone, "keys")})
    for _ in range(6):
        driver.step()  # the evaluation of v0, then keys
    clock.advance(11)  # the dropped client's keys never come: the phase times out at 4 < 5
    driver.step()
    assert "secure aggregation attempt abandoned" in caplog.text
    assert "below SECAGG_THRESHOLD=5" in caplog.text
    assert queue.attempt.nonce != nonce and queue.attempt.phase == "keys"  # type: ignore[attr-defined]
    assert state_of(app).snapshot.version == 0
    assert all(np.all(t == 0) for t in served_model(client).values())


def test_a_restart_mid_phase_starts_the_round_again_with_a_new_nonce(
    secagg_app, key_file, clock
) -> None:
    app = secagg_app()
    client = app.test_client()
    driver = Driver(client, key_file, drop={(f"client-{n}", "shares") for n in range(1, 11)})
    for _ in range(7):  # the evaluation of v0, every client's keys, a shares task kept
        task = driver.step()
    old = state_of(app).queue.attempt  # type: ignore[attr-defined]
    assert task is not None and task["phase"] == "shares" and old.phase == "shares"
    state_of(app).close()
    again = secagg_app(write=False)  # the aggregator killed and started again
    queue = state_of(again).queue
    queue.open_round(0)  # type: ignore[attr-defined]
    assert queue.attempt.nonce != old.nonce and queue.attempt.phase == "keys"  # type: ignore[attr-defined]
    late = Driver(again.test_client(), key_file).answer(task)  # the old attempt's shares
    assert late.status_code == 409 and late.get_json()["error"] == "stale"
    Driver(again.test_client(), key_file).run(clock)
    assert state_of(again).snapshot.version == 1


def test_no_single_update_is_kept_in_files_or_logs(secagg_app, key_file, clock, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    app = secagg_app(SAVE_MODEL=1)
    client = app.test_client()
    driver = Driver(client, key_file)
    driver.run(clock)
    state_of(app).close()
    assert len(driver.sent) == 5
    files = [p.read_bytes() for p in state_of(app).settings.model_dir.rglob("*") if p.is_file()]
    assert files
    for name in driver.sent:
        needle = np.full(16, value_of(name), np.float32).tobytes()
        assert not any(needle in blob for blob in files), f"{name}'s update is in MODEL_DIR"
        assert f"{value_of(name):.4f}" not in caplog.text
    mean = np.full(16, expected_mean(list(driver.sent)), np.float32).tobytes()
    assert any(mean in blob for blob in files)  # the search can find what is there


def test_malformed_masked_inputs_and_reports_get_4xx(secagg_app, key_file, clock) -> None:
    app = secagg_app()
    client = app.test_client()
    driver = Driver(client, key_file)
    for _ in range(11):
        driver.step()  # the evaluation of v0, keys, then shares
    offer = client.post("/v1/tasks", json={"worker": "wk-1"}).get_json()
    task = offer["task"]
    assert task["kind"] == "train" and "secagg" in task
    good = driver.masked_body(task)
    tensors, meta = weights.decode(good, dtypes=("U64",))
    as_float = weights.encode({k: v.astype(np.float32) for k, v in tensors.items()}, meta)
    assert client.post("/v1/secagg/masked", data=as_float).status_code == 422
    cut = dict(tensors)
    cut.pop(next(iter(cut)))
    assert (
        client.post("/v1/secagg/masked", data=weights.encode(cut, meta, wire=True)).status_code
        == 422
    )
    for key, bad in (("nonce", "zz"), ("lease", "not hex"), ("client_id", "someone")):
        body = weights.encode(tensors, {**meta, key: bad}, wire=True)
        assert client.post("/v1/secagg/masked", data=body).status_code == 400
    stale = weights.encode(tensors, {**meta, "nonce": "00" * 16}, wire=True)
    assert client.post("/v1/secagg/masked", data=stale).status_code == 409
    assert client.post("/v1/secagg/masked", data=b"junk").status_code == 400
    assert client.post("/v1/secagg", data=b"[1]").status_code == 400
    plain = weights.encode({k: np.zeros(v.shape, np.float32) for k, v in tensors.items()},
                           {"client_id": task["client"], "update_id": task["id"], "task": task["id"],
                            "lease": task["lease"], "base_version": "0", "num_samples": "10"})  # fmt: skip
    refused = client.post("/v1/updates", data=plain)
    assert refused.status_code == 422 and refused.get_json()["error"] == "masked_only"
    queue = state_of(app).queue
    assert len(queue.attempt.masked) == 0  # type: ignore[attr-defined]
    assert client.post("/v1/secagg/masked", data=good).status_code == 200
    assert client.post("/v1/secagg/masked", data=good).get_json()["duplicate"] is True
    assert len(queue.attempt.masked) == 1  # type: ignore[attr-defined]


def test_two_workers_run_secure_rounds_end_to_end(make_settings, key_file) -> None:
    """The real worker loop (fedsim.client.worker) on two threads, fake learners, one round."""
    import threading
    import time

    from fedsim.aggregator.app import create_app
    from fedsim.client.worker import Worker
    from helpers.builders import LABELS, write_plan, write_tokens, write_v0
    from helpers.fakes import InProcess, in_process_transport
    from helpers.secagg import SmallLearner

    settings = make_settings(**{**SECAGG, "SECAGG_KEY_FILE": key_file, "MODEL": "mlp"})
    write_v0(settings.model_dir)
    write_plan(settings)
    write_tokens(settings)
    adapter = InProcess(
        lambda: create_app({"TESTING": True, "FEDSIM_SETTINGS": settings, "FEDSIM_TICKER": False})
    )
    learners = [SmallLearner(LABELS), SmallLearner(LABELS)]
    workers = [
        Worker(settings, in_process_transport(adapter), lambda n, i=i: learners[i],
               uid=f"host{i}-{100 + i}-ab", sleep=lambda s: time.sleep(min(s, 0.005)))
        for i in range(2)
    ]  # fmt: skip
    threads = [threading.Thread(target=w.run) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a worker did not finish"
    values = [v for learner in learners for v in learner.trained.values()]
    assert len(values) == 5  # each sampled client trained once: no masked input sent twice
    client = adapter.app.test_client()
    for tensor in served_model(client).values():
        assert np.allclose(tensor, np.mean(values), atol=1e-6)  # iid: equal counts
    assert client.get("/v1/status").get_json()["finished"] is True


@pytest.mark.parametrize("rule", ["fedadam", "fedprox"])
def test_server_optimizers_and_durable_runs_take_the_secure_mean(secagg_app, key_file, clock, rule):
    app = secagg_app(AGGREGATION=rule, DURABLE="true", ROUNDS=2)
    client = app.test_client()
    Driver(client, key_file).run(clock)
    state = state_of(app)
    assert state.snapshot.version == 2 and state.queue.finished
    assert all(np.isfinite(t).all() for t in served_model(client).values())
    state.close()
    again = state_of(secagg_app(AGGREGATION=rule, DURABLE="true", ROUNDS=2, write=False))
    assert again.snapshot.version == 2 and again.queue.finished  # resumed whole


def test_dp_under_secure_aggregation_noises_the_equal_weight_mean(secagg_app, key_file, clock):
    # Dirichlet clients hold different sample counts: under DP each masks its delta with
    # weight 1, and the aggregator adds DP's central noise, std z * DP_CLIP / m, to the mean.
    app = secagg_app(PARTITION="dirichlet", DP="central", DP_CLIP=60, DP_NOISE=1)
    client = app.test_client()
    state = state_of(app)
    sampled = state.queue.open_round(0).sampled  # type: ignore[attr-defined]
    assert len({state.queue.clients[n].samples for n in sampled}) > 1  # unequal counts
    weights_given: list[int] = []
    driver = Driver(client, key_file)
    answer = driver.answer

    def noting(task, worker="wk-1"):
        if task["kind"] == "train":
            weights_given.append(task["secagg"]["weight"])
        return answer(task, worker)

    driver.answer = noting
    driver.run(clock)

    assert weights_given == [1] * 5
    clients = [f"client-{n}" for n in sampled]
    noise = np.concatenate(
        [
            (t.astype(np.float64) - expected_mean(clients)).ravel()
            for t in served_model(client).values()
        ]
    )
    assert abs(noise.std() / (60 / 5) - 1) < 0.02  # 199,210 draws of std 12
    assert abs(noise.mean()) < 0.2
    epsilon = client.get("/v1/status").get_json()["privacy"]["epsilon"]
    assert epsilon is not None and 0 < epsilon < float("inf")
