"""Workers against the real aggregator app in this process: task by task, crash by crash.

Real Worker, Outbox, Transport and Flask app; the learner is a fake (no TensorFlow)
whose weights say which task made them. Several workers run in threads.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time

import numpy as np
import pytest
from flask import Flask

from fedsim import checkpoints, tfruntime, weights
from fedsim.aggregator import history, tasks
from fedsim.aggregator.app import create_app
from fedsim.client import worker as worker_module
from fedsim.client.transport import ProtocolError, Transport
from fedsim.client.worker import Worker
from fedsim.pipeline.compress import WIRE_NAMES
from helpers import (
    TYPED_TOKEN,
    FakeLearner,
    InProcess,
    in_process_transport,
    write_plan,
    write_tokens,
    write_v0,
)


def quick_sleep(seconds: float) -> None:
    time.sleep(min(seconds, 0.005))


def setup(make_settings, hold: float | None = None, **overrides: object):
    """Settings and the app in this process; `hold`: how long an idle ask waits there."""
    settings = make_settings(**{"MODEL": "mlp", "IDLE_SAVE_SECONDS": 0.2, **overrides})
    write_v0(settings.model_dir)
    write_plan(settings)
    write_tokens(settings)

    def make_app() -> Flask:
        config = {"FEDSIM_SETTINGS": settings, "FEDSIM_TICKER": False, "FEDSIM_HOLD": hold}
        return create_app({"TESTING": True, **config})

    return settings, InProcess(make_app)


def run_workers(settings, adapter: InProcess, count: int) -> list[Worker]:
    workers = [
        Worker(
            settings,
            in_process_transport(adapter),
            lambda n: FakeLearner(),
            uid=f"host{i}-{100 + i}-ab",  # as new_worker_id makes them: host, pid, random
            sleep=quick_sleep,
        )
        for i in range(count)
    ]
    threads = [threading.Thread(target=w.run) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a worker did not finish"
    return workers


def status(adapter: InProcess) -> dict:
    return adapter.app.test_client().get("/v1/status").get_json()


def test_the_default_run_one_client_per_worker_every_slice_once(make_settings, caplog):
    settings, adapter = setup(make_settings)
    with caplog.at_level(logging.INFO):
        workers = run_workers(settings, adapter, 3)
    # Every worker kept one logical client for the whole run, as the original replicas.
    assert sorted(w.summary.clients[0] for w in workers) == ["client-1", "client-2", "client-3"]
    assert all(len(w.summary.clients) == 1 and w.summary.trained == 4 for w in workers)
    s = status(adapter)
    assert (s["version"], s["updates"], s["samples"], s["finished"]) == (12, 12, 60000, True)
    assert "client-2: slices 5-8 (samples 20000-39999)" in caplog.text
    # Scored at versions 0, 3, 6, 9, 12 (EVAL_EVERY: one round's worth, 3 clients).
    assert [e["version"] for e in history.read(settings.model_dir)] == [0, 3, 6, 9, 12]
    assert checkpoints.load_newest(settings.model_dir).version == 12
    assert all(w.summary.counts.unconfirmed == 0 for w in workers)


def test_a_worker_beyond_the_work_exits_saying_so(make_settings, caplog):
    settings, adapter = setup(make_settings, CLIENT_SLICES="1-2 3-4")
    with caplog.at_level(logging.INFO):
        workers = run_workers(settings, adapter, 3)
    assert sum(w.summary.trained for w in workers) == 4
    assert (
        "no work for this worker: all 2 logical clients are trained by other workers" in caplog.text
    )
    assert status(adapter)["finished"] is True


def test_rounds_of_sampled_shards_clients_with_two_workers(make_settings):
    settings, adapter = setup(
        make_settings,
        AGGREGATION="fedavg",
        PARTITION="shards",
        NUM_CLIENTS=20,
        CLIENTS_PER_ROUND=5,
        ROUNDS=3,
    )
    workers = run_workers(settings, adapter, 2)
    s = status(adapter)
    assert (s["version"], s["updates"], s["finished"]) == (3, 15, True)
    # One history entry per round, besides version 0, with the round's sampled clients.
    entries = history.read(settings.model_dir)
    assert [(e["version"], e["round"]) for e in entries] == [(0, None), (1, 1), (2, 2), (3, 3)]
    for entry in entries[1:]:
        expected = [f"client-{n}" for n in tasks.sample(42, entry["round"], 5, 20)]
        assert sorted(entry["clients"]) == sorted(expected)
    assert sum(w.summary.trained for w in workers) == 15
    assert sum(w.summary.evaluations for w in workers) == 4


def test_asynchronous_rules_off_slices_make_rounds_times_c_updates(make_settings):
    settings, adapter = setup(
        make_settings, AGGREGATION="fedasync", PARTITION="iid", NUM_CLIENTS=10, ROUNDS=4
    )
    run_workers(settings, adapter, 2)
    s = status(adapter)
    assert (s["updates"], s["version"], s["finished"]) == (4, 4, True)  # ROUNDS x C = 4 x 1
    assert [e["version"] for e in history.read(settings.model_dir)] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("rule", ["async-weighted", "fedavg"])
def test_every_update_counts_once_across_hard_kills(make_settings, rule):
    # Prepare: SAVE_MODEL=2, and the aggregator dies (unsaved state lost) after its 4th
    # and 9th POST, so accepted updates and an open round are lost.
    extra = {"AGGREGATION": rule, "SAVE_MODEL": 2}
    if rule == "fedavg":
        extra.update(PARTITION="iid", NUM_CLIENTS=6, CLIENTS_PER_ROUND=3, ROUNDS=3)
    settings, adapter = setup(make_settings, **extra)

    def crash(adapter: InProcess, path: str) -> None:
        if adapter.posts in (4, 9):
            adapter.crash()

    adapter.after_post = crash
    # Execute: one worker, so the run is repeatable.
    (worker,) = run_workers(settings, adapter, 1)
    # Assert: every task's update is in the final model exactly once.
    s = status(adapter)
    expected = 12 if rule == "async-weighted" else 9
    assert s["updates"] == expected and s["finished"] is True
    assert worker.summary.counts.unconfirmed == 0
    final = checkpoints.load_newest(settings.model_dir)
    assert int(final.metadata["updates"]) == expected
    if rule == "async-weighted":
        # Running mean of the 12 slices, each marked by its first image index + 1.
        marks = [5000 * k + 1 for k in range(12)]
        np.testing.assert_allclose(final.tensors["output/bias"], np.mean(marks), rtol=1e-5)


def test_samples_that_differ_from_the_plan_stop_the_worker(make_settings):
    # A shards plan depends on the labels: a worker with other data makes other clients.
    settings, adapter = setup(make_settings, PARTITION="shards", NUM_CLIENTS=10)
    learner = FakeLearner(labels=np.zeros(60000, np.uint8))
    worker = Worker(
        settings, in_process_transport(adapter), lambda n: learner, uid="odd", sleep=quick_sleep
    )
    with pytest.raises(ProtocolError, match="do not match the aggregator's plan"):
        worker.run()


def test_the_aggregator_gone_for_good_stops_the_worker_with_a_message(make_settings, monkeypatch):
    settings, adapter = setup(make_settings)
    monkeypatch.setattr(worker_module, "STARTUP_SECONDS", 0.05)
    transport = in_process_transport(adapter)
    transport.base_url = "http://nowhere.invalid"
    transport.session = __import__("requests").Session()
    worker = Worker(settings, transport, lambda n: FakeLearner(), uid="x", sleep=quick_sleep)
    with pytest.raises(worker_module.AggregatorUnreachable, match="is it running"):
        worker.run()


@pytest.mark.parametrize(
    ("tf_threads", "workers", "cpus", "expected"),
    [(0, 3, 2, 1), (0, 1, 2, 2), (0, 2, 8, 4), (3, 2, 8, 3), (0, 0, 4, 4)],
)
def test_threads_share_the_cores_among_workers(tf_threads, workers, cpus, expected):
    assert tfruntime.threads_for(tf_threads, workers, cpu_count=cpus) == expected


# --- the original hand-started client ---------------------------------------------------


def test_the_original_prompts_take_any_client_id_and_ask_again_on_a_bad_range(make_settings):
    from fedsim.client import handstart

    answers = iter(["  Alice's laptop ", "1", "5 1", "2 x", "3 4"])
    said: list[str] = []
    typed = handstart.ask(make_settings(), lambda prompt: next(answers), said.append)
    assert typed == handstart.Typed("Alice's laptop", 3, 4)
    assert len(said) == 3 and all("Dataset Range is two slice numbers" in s for s in said)
    # Enter alone at the first prompt: a worker instead.
    assert handstart.ask(make_settings(), lambda prompt: "", said.append) is None


@pytest.mark.parametrize("codec", ["none", "int8", "topk"])
def test_a_hand_started_client_trains_its_range_outside_the_plan(make_settings, codec):
    from fedsim.client import handstart, outbox

    settings, adapter = setup(make_settings, COMPRESSION=codec)
    link = in_process_transport(adapter)
    link.session.headers["Authorization"] = f"Bearer {TYPED_TOKEN}"
    box = outbox.Outbox(
        "typed",
        link,
        outbox.Counts(),
        clock=time.monotonic,
        sleep=quick_sleep,
        idle_save_seconds=0.2,
    )
    summary = handstart.run(settings, handstart.Typed("typed", 2, 3), link, FakeLearner(), box)
    assert summary.trained == 2 and summary.counts.pushes_accepted == 2
    s = status(adapter)
    assert s["updates"] == 2 and {"typed"} <= {c["id"] for c in s["clients"]}
    assert s["finished"] is False  # the plan's own clients have not trained yet


def test_a_hand_started_client_is_told_that_round_rules_need_workers(make_settings):
    from fedsim.client import handstart, outbox, worker

    settings, adapter = setup(make_settings, AGGREGATION="fedavg")
    link = in_process_transport(adapter)
    box = outbox.Outbox(
        "typed",
        link,
        outbox.Counts(),
        clock=time.monotonic,
        sleep=quick_sleep,
        idle_save_seconds=0.2,
    )
    with pytest.raises(worker.AggregatorUnreachable, match="only asynchronous rules"):
        handstart.run(settings, handstart.Typed("typed", 1, 1), link, FakeLearner(), box)


def test_the_history_survives_a_restart_without_the_versions_a_crash_lost(make_settings):
    settings, adapter = setup(make_settings, SAVE_MODEL=100, IDLE_SAVE_SECONDS=3600)
    run_workers(settings, adapter, 1)  # 12 versions, checkpointed only at the end
    entries = history.read(settings.model_dir)
    assert [e["version"] for e in entries] == [0, 3, 6, 9, 12]
    # Versions 9 and 12 are lost with their checkpoint: a restart drops their scores.
    for version in (12,):
        checkpoints.path_for(settings.model_dir, version).unlink()
    checkpoints.save(
        settings.model_dir,
        8,
        checkpoints.load_newest(settings.model_dir).tensors,
        {"samples": 40000, "model": "mlp", "updates": 8},
        keep=5,
    )
    adapter.crash()
    assert [e["version"] for e in history.read(settings.model_dir)] == [0, 3, 6]
    assert [
        e["version"] for e in adapter.app.test_client().get("/v1/history").get_json()["history"]
    ] == [0, 3, 6]


def test_scaled_attackers_are_chosen_with_the_seed_and_their_updates_boosted(make_settings):
    settings, adapter = setup(
        make_settings,
        AGGREGATION="fedavg",
        PARTITION="iid",
        NUM_CLIENTS=4,
        CLIENTS_PER_ROUND=4,
        ROUNDS=1,
        ATTACK="scaled",
        ATTACKERS=1,
        ATTACK_SCALE=10,
    )
    (worker,) = run_workers(settings, adapter, 1)
    (attacker,) = tasks.choose_attackers(42, 1, 4)
    s = status(adapter)
    flagged = [c["id"] for c in s["clients"] if c.get("attacker")]
    assert flagged == [f"client-{attacker}"]
    entry = history.read(settings.model_dir)[-1]
    assert entry["attackers"] == [f"client-{attacker}"]
    # FakeLearner marks each update with its client's first image index + 1; from the all-zero
    # version 0 the attacker sends 10 times its mark, and fedavg weighs 15,000 images each.
    parts = {
        n: int(p.indices[0]) + 1 for n, p in enumerate(worker._plans[next(iter(worker._plans))], 1)
    }
    marks = [parts[n] * (10 if n == attacker else 1) for n in range(1, 5)]
    final = checkpoints.load_newest(settings.model_dir)
    np.testing.assert_allclose(final.tensors["output/bias"], np.mean(marks), rtol=1e-5)


def test_label_flip_attackers_train_on_flipped_labels(make_settings):
    settings, adapter = setup(
        make_settings,
        PARTITION="iid",
        NUM_CLIENTS=2,
        ROUNDS=1,
        CLIENTS_PER_ROUND=2,
        ATTACK="label-flip",
        ATTACKERS=2,
    )
    learner = FakeLearner()
    worker = Worker(
        settings, in_process_transport(adapter), lambda n: learner, uid="w", sleep=quick_sleep
    )
    worker.run()
    # Both clients attack: the last task trained on its images with labels y -> 9 - y.
    np.testing.assert_array_equal(learner.labels_seen, 9 - learner.labels[learner.last_indices])


@pytest.mark.parametrize(
    ("rule", "extra"),
    [
        ("fedadam", {"PARTITION": "iid", "NUM_CLIENTS": 6, "CLIENTS_PER_ROUND": 3, "ROUNDS": 4}),
        ("fedavgm", {"PARTITION": "iid", "NUM_CLIENTS": 6, "CLIENTS_PER_ROUND": 3, "ROUNDS": 4}),
        (
            "fedbuff",
            {
                "PARTITION": "iid",
                "NUM_CLIENTS": 6,
                "CLIENTS_PER_ROUND": 2,
                "ROUNDS": 4,
                "FEDBUFF_K": 3,
            },
        ),
    ],
)
def test_server_state_survives_hard_kills_bit_for_bit(make_settings, tmp_path, rule, extra):
    # The same run twice with one worker: unbroken, and killed after its 3rd and 7th POST
    # (unsaved state lost each time). Server momentum, moments and FedBuff's buffer are
    # restored from the checkpoints, so both end with the same weights, bit for bit.
    finals = []
    for crashes in ((), (3, 7)):
        settings, adapter = setup(
            make_settings,
            AGGREGATION=rule,
            SAVE_MODEL=1,
            MODEL_DIR=str(tmp_path / f"run-{len(crashes)}"),
            **extra,
        )

        def crash(adapter: InProcess, path: str, crashes=crashes) -> None:
            if adapter.posts in crashes:
                adapter.crash()

        adapter.after_post = crash
        run_workers(settings, adapter, 1)
        s = status(adapter)
        assert s["finished"] is True and s["updates"] == 4 * extra["CLIENTS_PER_ROUND"], s
        final = checkpoints.load_newest(settings.model_dir)
        finals.append({k: v for k, v in final.tensors.items() if not k.startswith("strategy/")})
    for name in finals[0]:
        np.testing.assert_array_equal(finals[0][name], finals[1][name])


def test_an_entry_after_a_torn_line_starts_a_line_of_its_own(tmp_path):
    (tmp_path / history.FILE).write_text('{"version": 0, "accuracy": 0.1, "loss": 2.3}\n{"versi')
    history.append(tmp_path, {"version": 1, "accuracy": 0.5, "loss": 1.0})
    assert [e["version"] for e in history.read(tmp_path)] == [0, 1]


def test_threads_are_sized_from_the_count_after_tensorflow_is_imported(make_settings):
    settings, adapter = setup(make_settings)
    transport = in_process_transport(adapter)
    other = in_process_transport(adapter)
    counts = []

    def warm_up() -> None:  # while this worker imports TensorFlow, two more say hello
        other.hello("hostB-1-aa")
        other.hello("hostC-1-aa")

    worker = Worker(
        settings,
        transport,
        lambda n: counts.append(n) or FakeLearner(),
        warm_up=warm_up,
        uid="hostA-1-aa",
        sleep=quick_sleep,
    )
    worker.start()
    assert counts == [3] and worker.name == "w1"


def test_the_worker_imports_nothing_from_the_aggregator():
    import ast
    from pathlib import Path

    import fedsim.client
    import fedsim.protocol

    for package in (fedsim.client, fedsim.protocol):
        for path in Path(package.__path__[0]).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                assert not any(n.startswith("fedsim.aggregator") for n in names), path.name


# --- compressed updates: every update applied, the codec and bytes logged ------------------


def pushed_bytes(workers: list[Worker]) -> int:
    return sum(w.summary.counts.bytes_pushed for w in workers)


@pytest.mark.parametrize("codec", ["fp16", "int8", "topk"])
def test_a_compressed_run_applies_every_update(make_settings, caplog, codec) -> None:
    settings, adapter = setup(make_settings, COMPRESSION=codec, COMPRESSION_DOWN="fp16")
    with caplog.at_level(logging.INFO):
        workers = run_workers(settings, adapter, 3)
    s = status(adapter)
    assert (s["version"], s["updates"], s["samples"], s["finished"]) == (12, 12, 60000, True)
    assert sum(w.summary.counts.pushes_accepted for w in workers) == 12
    assert re.search(
        rf"push  base \d+ -> version \d+ \({WIRE_NAMES[codec]}, \d+ bytes, retries 0\)",
        caplog.text,
    )
    assert re.search(r"pull  version \d+ \(fp16, \d+ bytes", caplog.text)
    assert "bytes pushed" in workers[0].summary.line("worker-1", 1.0)


def test_int8_and_topk_send_far_fewer_bytes_than_float32(make_settings, tmp_path) -> None:
    sizes = {}
    for codec in ("none", "int8", "topk"):
        folder = tmp_path / codec
        settings, adapter = setup(
            make_settings,
            COMPRESSION=codec,
            COMPRESSION_TOPK="0.02",  # 4 bytes an entry: the top 2% still 30 times fewer
            MODEL_DIR=str(folder / "models"),
            WORKER_STATE_DIR=str(folder / "state"),
        )
        workers = run_workers(settings, adapter, 3)
        assert status(adapter)["updates"] == 12
        sizes[codec] = pushed_bytes(workers)
    assert sizes["none"] / sizes["int8"] >= 3.9
    assert sizes["none"] / sizes["topk"] >= 30


def test_topk_residuals_follow_each_client_in_the_shared_folder(make_settings) -> None:
    settings, adapter = setup(
        make_settings,
        COMPRESSION="topk",
        AGGREGATION="fedavg",
        PARTITION="shards",
        NUM_CLIENTS=20,
        CLIENTS_PER_ROUND=5,
        ROUNDS=3,
    )
    workers = run_workers(settings, adapter, 2)
    assert status(adapter)["updates"] == 15
    trained = {c for w in workers for c in w.summary.clients}
    files = {p.stem: p for p in settings.worker_state_dir.iterdir()}
    assert set(files) == trained
    run = adapter.app.extensions["fedsim"].queue.run  # the run id every task carried
    assert len(run) == 16
    for client, path in files.items():
        _, meta = weights.decode(path.read_bytes(), dtypes=("F32", "I32"))
        assert (meta["client"], meta["run"]) == (client, run)


class DivergingLearner(FakeLearner):
    """Trains as FakeLearner until task `at`, whose weights come out NaN."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def train(self, tensors, indices, settings, seed, *, labels=None):
        out, trained = super().train(tensors, indices, settings, seed, labels=labels)
        if len(self.trained) == self.at:
            out = {name: np.full(t.shape, np.nan, np.float32) for name, t in out.items()}
        return out, trained


def test_a_diverged_training_is_reported_and_the_run_stops_cleanly(make_settings, caplog):
    settings, adapter = setup(
        make_settings, AGGREGATION="fedavg", PARTITION="iid", NUM_CLIENTS=4, CLIENTS_PER_ROUND=2
    )
    learner = DivergingLearner(at=3)  # round 2's first task
    worker = Worker(
        settings, in_process_transport(adapter), lambda n: learner, uid="h-1-ab", sleep=quick_sleep
    )
    with caplog.at_level(logging.INFO):
        summary = worker.run()  # returns: the run is over, the worker exits normally

    assert (summary.trained, summary.diverged) == (2, 1)
    got = status(adapter)
    assert got["finished"] and got["version"] == 1 and got["round"]["rounds_done"] == 1
    assert "diverged (non-finite weights in " in got["stopped"]
    assert "from version 1" in got["stopped"] and "the run stops at version 1" in got["stopped"]
    assert "diverged: non-finite weights in" in caplog.text
    assert ", 1 diverged, " in summary.line("w1", 1.0)
    # Version 1 was scored, and nothing after it was published or trained.
    assert [e["version"] for e in history.read(settings.model_dir)] == [0, 1]


def test_a_worker_gives_its_free_memory_back_when_it_waits_after_work(make_settings, monkeypatch):
    # Asks answered at once (no hold): a worker finds no task while another ends the round.
    settings, adapter = setup(
        make_settings, hold=0.0, AGGREGATION="fedavg", PARTITION="iid", NUM_CLIENTS=6,
        CLIENTS_PER_ROUND=3, ROUNDS=3,
    )  # fmt: skip
    done: dict[threading.Thread, int] = {}  # tasks done, by worker thread
    empty: dict[threading.Thread, bool] = {}  # whether its last ask came back without work
    released: dict[threading.Thread, list[tuple[int, bool]]] = {}  # (done, empty) at each
    do, ask = Worker._do, Transport.ask

    def counted(self: Worker, task) -> None:
        do(self, task)
        me = threading.current_thread()
        done[me] = done.get(me, 0) + 1

    def asked(self: Transport, *args, **kwargs):
        offer = ask(self, *args, **kwargs)
        empty[threading.current_thread()] = offer.task is None
        return offer

    def release() -> str:
        me = threading.current_thread()
        released.setdefault(me, []).append((done.get(me, 0), empty.get(me, False)))
        return "recorded"

    monkeypatch.setattr(Worker, "_do", counted)
    monkeypatch.setattr(Transport, "ask", asked)
    monkeypatch.setattr(worker_module.allocator, "release", release)
    run_workers(settings, adapter, 2)
    assert status(adapter)["finished"] is True
    assert released, "no worker gave memory back while it waited between rounds"
    for calls in released.values():
        counts = [n for n, _ in calls]
        assert all(was_empty for _, was_empty in calls)  # only when there was no work
        assert counts[0] > 0  # not before its first task
        assert all(a < b for a, b in itertools.pairwise(counts))  # once a pause, after work
