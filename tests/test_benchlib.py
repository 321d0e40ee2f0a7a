"""scripts/benchlib, the benchmarks' harness: the load check, the marks, the JSON, the ports."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from benchlib import (  # noqa: E402
    LOAD_LIMIT,
    Bench,
    PeakMemory,
    add_arguments,
    free_port,
)
from benchlib.docker import COMPOSE_RESET, clean_env, mnist_files, status  # noqa: E402
from benchlib.procs import cpu_seconds, tree_rss  # noqa: E402
from fedsim.experiment.procs import trees_rss  # noqa: E402


def fake_load(*values: float):
    """A stand-in for os.getloadavg giving `values` one after another (the last repeats)."""
    queue = list(values)

    def loadavg() -> tuple[float, float, float]:
        value = queue.pop(0) if len(queue) > 1 else queue[0]
        return (value, 0.0, 0.0)

    return loadavg


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


# --- the load check -------------------------------------------------------------------


def test_above_the_limit_a_benchmark_refuses_with_one_line():
    with pytest.raises(SystemExit) as refused:
        Bench("bench_x", loadavg=fake_load(1.37))

    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("bench_x: the 1-minute load is 1.37, above 1")
    assert "--force" in message


def test_at_the_limit_it_runs_and_its_figures_are_not_marked():
    bench = Bench("bench_x", loadavg=fake_load(LOAD_LIMIT, 0.4))

    assert bench.load_start == LOAD_LIMIT and not bench.loaded
    assert bench.figure({"accuracy": 0.97}) == {"accuracy": 0.97, "load": 0.4, "loaded": False}
    assert bench.mark("accuracy 0.97") == "accuracy 0.97"


def test_forced_above_the_limit_every_figure_carries_its_load_and_loaded(capsys):
    bench = Bench("bench_x", force=True, loadavg=fake_load(2.5, 3.25))

    assert bench.loaded
    assert bench.figure({"seconds": 12.0}) == {"seconds": 12.0, "load": 3.25, "loaded": True}
    assert bench.figure({"seconds": 9.0}, load=2.5) == {"seconds": 9.0, "load": 2.5, "loaded": True}
    assert bench.mark("wall 12 s", load=2.5) == "wall 12 s  [loaded: load 2.50]"
    bench.say("wall 12 s", load=2.5)
    bench.mark_table()
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "wall 12 s  [loaded: load 2.50]",
        "[loaded: the figures above were taken from load 2.50]",
    ]


def test_forced_below_the_limit_nothing_is_marked():
    bench = Bench("bench_x", force=True, loadavg=fake_load(0.2))

    assert not bench.loaded
    assert bench.figure({"n": 1})["loaded"] is False


def test_options_force_and_json(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert "--force" in parser.format_help()
    args = parser.parse_args(["--force", "--json", str(tmp_path / "out.json")])
    assert args.force and args.json == tmp_path / "out.json"


# --- the JSON output ------------------------------------------------------------------


def test_json_output_carries_the_load_at_start_and_end(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["scripts/bench_x.py", "--rounds", "2"])
    path = tmp_path / "out.json"
    bench = Bench("bench_x", json_path=path, loadavg=fake_load(0.5, 0.75, 0.9))
    results = [bench.figure({"accuracy": 0.9})]

    doc = bench.finish(results)

    assert json.loads(path.read_text()) == doc
    assert doc == {
        "benchmark": "bench_x",
        "command": ["scripts/bench_x.py", "--rounds", "2"],
        "cpus": os.cpu_count(),
        "load_start": 0.5,
        "load_end": 0.9,
        "load_limit": LOAD_LIMIT,
        "forced": False,
        "loaded": False,
        "results": [{"accuracy": 0.9, "load": 0.75, "loaded": False}],
    }


def test_without_json_path_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    doc = Bench("bench_x", loadavg=fake_load(0.1)).finish({"a": 1})
    assert doc["results"] == {"a": 1} and list(tmp_path.iterdir()) == []


# --- ports, processes, runs -----------------------------------------------------------


def test_free_port_is_free_to_bind():
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_memory_and_cpu_of_this_process():
    assert tree_rss(os.getpid()) > 10 * 2**20
    assert cpu_seconds(os.getpid()) > 0
    with PeakMemory(os.getpid(), every=0.01) as memory:
        pass
    assert memory.peak >= memory.last > 0


# --- Compose and Swarm ----------------------------------------------------------------


def test_the_reset_takes_every_profile_and_the_volumes():
    assert COMPOSE_RESET == ("--profile", "*", "down", "-v", "--remove-orphans")


def test_clean_env_drops_fedsim_and_compose_settings(monkeypatch):
    monkeypatch.setenv("AGGREGATION", "krum")
    monkeypatch.setenv("COMPOSE_PROJECT_NAME", "x")
    monkeypatch.setenv("STACK", "y")
    env = clean_env(AGGREGATOR_PORT="1234")
    assert not {"AGGREGATION", "COMPOSE_PROJECT_NAME", "STACK"} & set(env)
    assert env["AGGREGATOR_PORT"] == "1234" and env["PATH"] == os.environ["PATH"]


def test_mnist_files_plain_or_gzipped_and_status_of_a_closed_port(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"")
    found = mnist_files(tmp_path)
    assert found["train-images-idx3-ubyte"] == tmp_path / "train-images-idx3-ubyte.gz"
    assert found["t10k-labels-idx1-ubyte"] == tmp_path / "t10k-labels-idx1-ubyte"
    assert found["train-labels-idx1-ubyte"] is None
    assert status(free_port()) is None


# --- bench_scale's measurements, on a small plan ----------------------------------------


def test_bench_scale_measures_the_aggregator_of_a_plan_without_training(tmp_path):
    import bench_scale
    from fedsim import config
    from helpers import write_plan, write_population, write_tokens, write_v0

    env = bench_scale.environment(tmp_path, 50, 10, 12, tmp_path / "data", "lognormal:0,0.5")
    settings = config.load(environ=env, env_file=tmp_path / "no.env")
    write_v0(settings.model_dir)
    write_plan(settings)
    write_population(settings)
    write_tokens(settings)

    got = bench_scale.measure_aggregator(env, rounds=12)

    assert got["plan_held_bytes"] == 50 * (4 + 32 + 40)  # the roster's columns
    assert got["rss_after_bytes"] >= got["rss_before_bytes"] > 0
    assert got["checkpoint_bytes"] > 796_840  # the mlp's float32 weights and the metadata
    assert got["status_rows"] == 50 and got["status_bytes"] > 50 * 200  # a row is ~300 B
    # A page of 10 of the 13 entries (versions 0-12), each naming its 10 clients.
    assert 0 < got["history_page_bytes"] < got["history_bytes"]


def test_profile_shares_name_the_upload_steps_seen_and_the_rest():
    import cProfile
    import pstats

    import numpy as np

    from benchlib.profile import shares
    from fedsim import weights

    data = weights.encode({"w": np.ones((300, 300), dtype=np.float32)}, {})
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(20):
        weights.decode(data)
        sorted(range(20_000), key=lambda n: -n)  # work outside every step: "the rest"
    profile.disable()
    found = dict(shares(pstats.Stats(profile)))
    assert set(found) == {"decode (safetensors)", "the rest"}
    assert 0 < found["decode (safetensors)"] < 1 and 0 < found["the rest"] < 1
    assert sum(found.values()) == pytest.approx(1)


def test_profile_run_memory_runs_the_worker_loop_against_the_aggregator(tmp_path):
    """The stand-in learner goes through the real worker loop and gunicorn: the run reaches its
    last round, and each process's memory is read."""
    import subprocess

    out = tmp_path / "profile.json"
    argv = [sys.executable, str(ROOT / "scripts" / "profile_run_memory.py"), "--model", "mlp"]
    argv += ["--rounds", "3", "--workers", "2", "--every", "1", "--from", "1"]
    argv += ["--force", "--json", str(out)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "services"), str(ROOT / "scripts")]),
    }
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = json.loads(out.read_text())["results"]
    rounds = [s["round"] for s in result["samples"]]  # rounds closed between looks share one
    assert rounds == sorted(set(rounds)) and rounds[-1] == 3
    assert all(s["aggregator_rss_bytes"] > 0 for s in result["samples"])
    assert all(len(s["worker_rss_bytes"]) == 2 for s in result["samples"])
    assert "round    3" in done.stdout and "growth from round " in done.stdout


def test_memory_of_named_process_trees_and_their_sum():
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        assert child.stdout.readline() == "up\n"  # running, its interpreter loaded
        while Path(f"/proc/{done.pid}/status").read_text().find("State:\tZ") < 0:
            time.sleep(0.01)  # exited, not yet reaped: a zombie
        got = trees_rss({"me": os.getpid(), "child": child.pid, "done": done.pid,
                         "gone": 2**22 + 1})  # fmt: skip
        # The child is in my tree too: each name is its process with its descendants.
        assert got["child"] > 2**20 and got["me"] >= got["child"] + 10 * 2**20
        assert got.keys() == {"me", "child"}  # an exited process is left out, not read as 0
        with PeakMemory(lambda: {"a": 3, "b": 4}, every=0.01) as memory:
            time.sleep(0.05)
        assert (memory.last, memory.parts, memory.peak) == (7, {"a": 3, "b": 4}, 7)
    finally:
        child.kill()
        child.communicate()  # reaps it and closes its pipe
        done.wait()


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--release-every", "-1"], "--release-every must be 0 (never) or more, got -1"),
     (["--gc-every", "-2"], "--gc-every must be 0 (never) or more, got -2"),
     (["--momentum", "1"], "--momentum must be at least 0 and below 1, got 1.0"),
     (["--momentum", "-0.1"], "--momentum must be at least 0 and below 1, got -0.1")],
)  # fmt: skip
def test_profile_worker_memory_refuses_a_bad_option_in_one_line(tmp_path, args, message):
    out = tmp_path / "out.json"
    said = subprocess.run(
        [sys.executable, str(ROOT / "scripts/profile_worker_memory.py"), *args, "--json", str(out)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    assert said.returncode == 2, said
    assert said.stderr.strip().splitlines()[-1].endswith(message), said.stderr
    assert not out.exists()  # refused before anything ran or was written
