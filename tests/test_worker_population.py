"""Workers acting out the population against the real aggregator app in this process:
slow clients really wait (CLOCK=real), dropped tasks are given back or left to their lease.

Real Worker, Transport and Flask app; a fake learner (no TensorFlow) and a fake clock whose
sleep only moves it, shared by the worker and the aggregator, so nothing really waits.
"""

from __future__ import annotations

import logging
import re

import pytest
from flask import Flask

from fedsim.aggregator import tasks
from fedsim.aggregator.app import create_app
from fedsim.aggregator.tasks import ids
from fedsim.client.worker import Worker
from fedsim.data.population import drop_draw
from helpers import (
    WORKERS_TOKEN,
    FakeClock,
    FakeLearner,
    InProcess,
    in_process_transport,
    write_plan,
    write_population,
    write_tokens,
    write_v0,
)

TOKEN = "Bearer " + WORKERS_TOKEN
MLP_BYTES = 199_210 * 4  # the mlp's float32 weights: pulled, and pushed back
# 4 iid clients, 2 a round, 2 rounds of fedavg
RUN = {"AGGREGATION": "fedavg", "PARTITION": "iid", "NUM_CLIENTS": 4}
RUN |= {"CLIENTS_PER_ROUND": 2, "ROUNDS": 2}


class SleepLog(FakeClock):
    """The fake clock, remembering every sleep."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        super().sleep(seconds)


def setup(make_settings, clock: FakeClock, **overrides: object):
    settings = make_settings(**{"MODEL": "mlp", "IDLE_SAVE_SECONDS": 0.2, **RUN, **overrides})
    write_v0(settings.model_dir)
    write_plan(settings)
    write_population(settings)
    write_tokens(settings)

    def make_app() -> Flask:
        config = {"FEDSIM_SETTINGS": settings, "FEDSIM_TICKER": False, "FEDSIM_CLOCK": clock}
        return create_app({"TESTING": True, **config})

    return settings, InProcess(make_app)


def run_worker(settings, adapter: InProcess, clock: FakeClock) -> Worker:
    worker = Worker(
        settings,
        in_process_transport(adapter),
        lambda n: FakeLearner(),  # each task "trains" in 0.01 s
        uid="host0-100-ab",
        clock=clock,
        sleep=clock.sleep,
    )
    worker.run()
    return worker


def status(adapter: InProcess) -> dict:
    return adapter.app.test_client().get("/v1/status").get_json()


def test_slow_clients_wait_their_extra_compute_and_network_time(make_settings, caplog) -> None:
    clock = SleepLog()
    settings, adapter = setup(
        make_settings, clock, CLIENT_SPEED="3", CLIENT_BANDWIDTH="1e6", TIME_SCALE="2"
    )
    with caplog.at_level(logging.INFO):
        worker = run_worker(settings, adapter, clock)
    assert status(adapter)["finished"] and worker.summary.trained == 4
    # (speed 3 - 1) x 0.01 s measured + (pull + push) / 1e6 bytes/s, over TIME_SCALE 2
    expected = (2 * 0.01 + 2 * MLP_BYTES / 1e6) / 2
    assert sum(1 for s in clock.sleeps if s == pytest.approx(expected)) == 4
    assert caplog.text.count("(as a x3.00 client: waited 0.8s = compute 0.0s + network 1.6s") == 4


def test_equal_clients_wait_nothing_and_their_tasks_carry_no_profile(make_settings) -> None:
    clock = SleepLog()
    settings, adapter = setup(make_settings, clock)
    offered = [
        adapter.app.test_client()
        .post("/v1/tasks", json={"worker": "host9-1-aa"}, headers={"Authorization": TOKEN})
        .get_json()["task"]
        for _ in range(2)  # version 0's evaluation, then a training task
    ]
    task = offered[1]  # left to run out: the worker below takes it after TASK_TIMEOUT
    assert task["kind"] == "train" and "profile" not in task and "attempt" not in task
    run_worker(settings, adapter, clock)
    assert all(s <= 2.0 for s in clock.sleeps)  # only the waits for work (IDLE_WAIT_MAX)
    assert status(adapter)["population"]["speed"]["max"] == 1.0


def expected_dropouts(rounds: int, per_round: int, clients: int, p: float) -> int:
    """Attempts that drop before each task of the run succeeds, from the tasks' seeds."""
    dropped = 0
    for r in range(1, rounds + 1):
        for n in tasks.sample(42, r, per_round, clients):
            seed = ids.task_seed(42, ids.round_task(r, n))
            attempt = 0
            while drop_draw(seed, attempt) < p:
                dropped, attempt = dropped + 1, attempt + 1
    return dropped


def test_aborted_tasks_are_given_back_and_trained_again(make_settings, caplog) -> None:
    clock = SleepLog()
    settings, adapter = setup(make_settings, clock, DROPOUT="0.5", DROPOUT_MODE="abort")
    with caplog.at_level(logging.INFO):
        worker = run_worker(settings, adapter, clock)
    expected = expected_dropouts(2, 2, 4, 0.5)
    assert expected > 0, "the seed should make some task drop"
    s = status(adapter)
    assert s["finished"] and s["updates"] == 4 and worker.summary.trained == 4
    assert worker.summary.dropped == expected
    assert sum(c["dropouts"] for c in s["clients"]) == expected
    assert caplog.text.count("giving the task back") == expected
    assert caplog.text.count("given back by w1: its client dropped out") == expected
    assert "ran out after TASK_TIMEOUT" not in caplog.text  # nothing waited for its lease
    assert f"{expected} dropped" in worker.summary.line("w1", 1.0)


def test_silent_dropouts_wait_for_their_lease_to_run_out(make_settings, caplog) -> None:
    clock = SleepLog()
    settings, adapter = setup(
        make_settings, clock, DROPOUT="0.5", DROPOUT_MODE="silent", TASK_TIMEOUT="5"
    )
    with caplog.at_level(logging.INFO):
        worker = run_worker(settings, adapter, clock)
    expected = expected_dropouts(2, 2, 4, 0.5)
    s = status(adapter)
    assert s["finished"] and s["updates"] == 4 and worker.summary.dropped == expected
    assert sum(c["dropouts"] for c in s["clients"]) == 0  # nothing was given back
    assert caplog.text.count("silent until its lease runs out") == expected
    assert caplog.text.count("ran out after TASK_TIMEOUT=5s") == expected


def test_under_the_virtual_clock_a_worker_trains_each_task_on_its_own_base_version(
    make_settings, caplog
) -> None:
    # fedasync, 3 clients in flight: a task that starts on version v is often handed out
    # after newer versions were made; the worker pulls v itself, and no push is refused.
    clock = SleepLog()
    settings, adapter = setup(
        make_settings, clock, AGGREGATION="fedasync", NUM_CLIENTS=6, CLIENTS_PER_ROUND=3,
        ROUNDS=3, CLOCK="virtual", CLIENT_SPEED="lognormal:0,0.5", EVAL_EVERY=3,
    )  # fmt: skip
    with caplog.at_level(logging.INFO):
        worker = run_worker(settings, adapter, clock)
    s = status(adapter)
    assert s["finished"] and s["updates"] == 9 and s["version"] == 9
    assert worker.summary.trained == 9 and worker.summary.counts.pushes_refused == 0
    # Each pull was of the task's own base, which newer versions had often followed.
    pulled = [int(v) for v in re.findall(r" pull  version (\d+) ", caplog.text)]
    assert pulled == sorted(set(pulled)) and len(pulled) > 1


def test_under_the_virtual_clock_dropped_asynchronous_tasks_are_trained_again(
    make_settings,
) -> None:
    clock = SleepLog()
    settings, adapter = setup(
        make_settings, clock, AGGREGATION="fedasync", NUM_CLIENTS=6, CLIENTS_PER_ROUND=3,
        ROUNDS=3, CLOCK="virtual", DROPOUT="0.5", DROPOUT_MODE="abort",
    )  # fmt: skip
    worker = run_worker(settings, adapter, clock)
    s = status(adapter)
    assert s["finished"] and s["updates"] == 9 and worker.summary.trained == 9
    assert worker.summary.dropped > 0 and worker.summary.counts.pushes_refused == 0
