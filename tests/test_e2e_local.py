"""End to end without Docker: scripts/simulate.sh with real workers, then scripts/evaluate.sh."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from fedsim import checkpoints
from fedsim.aggregator import history
from helpers import free_port

ROOT = Path(__file__).resolve().parent.parent


def environment(tmp_path: Path, mnist_dir: Path, **settings: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT / "services"),  # this checkout's fedsim, whichever is installed
        "HOME": str(tmp_path),
        "FEDSIM_ENV_FILE": str(tmp_path / "no.env"),
        "DATA_DIR": str(mnist_dir),
        "MODEL_DIR": str(tmp_path / "models"),
        "TOKENS_FILE": str(tmp_path / "secrets" / "tokens.json"),
        "AGGREGATOR_URL": f"http://127.0.0.1:{free_port()}",
        "MODEL": "mlp",
        "MAX_WAIT": "0.5",
        **settings,
    }


def simulate(env: dict[str, str], workers: int) -> str:
    run = subprocess.run(
        [str(ROOT / "scripts" / "simulate.sh"), "--clients", str(workers)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    return run.stdout


@pytest.mark.slow
def test_two_workers_train_sampled_shards_clients_in_rounds(tmp_path, mnist_dir):
    # McMahan's non-IID partition on 20 clients, 5 sampled per round, on 2 workers.
    env = environment(
        tmp_path,
        mnist_dir,
        PARTITION="shards",
        NUM_CLIENTS="20",
        CLIENTS_PER_ROUND="5",
        AGGREGATION="fedavg",
        ROUNDS="3",
        EPOCHS="1",
    )
    out = simulate(env, 2)
    summaries = re.findall(r"^(worker-\d) +\| .* done: (\d+) updates trained", out, re.M)
    assert sorted(name for name, _ in summaries) == ["worker-1", "worker-2"]
    assert sum(int(n) for _, n in summaries) == 15
    assert re.search(r"round 3 closed \(all sampled clients\): 5 of 5 sampled clients", out)
    entries = history.read(tmp_path / "models")
    assert [(e["version"], e["round"]) for e in entries] == [(0, None), (1, 1), (2, 2), (3, 3)]
    assert all(len(e["clients"]) == 5 for e in entries[1:])
    assert entries[-1]["accuracy"] > entries[0]["accuracy"]


@pytest.mark.slow
def test_three_workers_train_a_model_above_90_percent(tmp_path, mnist_dir):
    model_dir = tmp_path / "models"
    # 3 x 2 slices of 3,000 images: 18,000 training images in all.
    env = environment(
        tmp_path,
        mnist_dir,
        NUM_IMAGES_TRAIN="3000",
        CLIENT_SLICES="1-2 3-4 5-6",
        EPOCHS="2",
    )
    out = simulate(env, 3)

    # Every process's lines carry its name; every worker finished with a summary.
    summaries = re.findall(
        r"^(worker-\d) +\| .* done: .*pushes (\d+) accepted (\d+) failed", out, re.M
    )
    assert sorted(name for name, _, _ in summaries) == ["worker-1", "worker-2", "worker-3"]
    assert re.search(r"^worker-\d +\| .* client-2: slices 3-4 \(samples 6000-11999\)$", out, re.M)
    assert re.search(r"^aggregator +\| ", out, re.M)
    accepted = sum(int(a) for _, a, _ in summaries)
    assert accepted == 6 and all(f == "0" for _, _, f in summaries)

    # The final checkpoint holds every accepted update, each counted once.
    final = checkpoints.load_newest(model_dir)
    assert final.version == accepted
    assert int(final.metadata["samples"]) == 6 * 3000

    report_path = tmp_path / "report.json"
    evaluation = subprocess.run(
        [str(ROOT / "scripts" / "evaluate.sh"), "--local", "--json", str(report_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert evaluation.returncode == 0, evaluation.stderr
    report = json.loads(report_path.read_text())
    assert f"accuracy: {report['accuracy']:.4f}" in evaluation.stdout
    assert report["version"] == accepted
    assert report["accuracy"] >= 0.90


@pytest.mark.slow
def test_int8_updates_from_real_workers_are_each_applied(tmp_path, mnist_dir):
    # 2 clients of one 3,000-image slice each, 2 slices in all, as int8 deltas.
    env = environment(
        tmp_path,
        mnist_dir,
        NUM_IMAGES_TRAIN="3000",
        CLIENT_SLICES="1 2",
        EPOCHS="1",
        COMPRESSION="int8",
        COMPRESSION_DOWN="fp16",
    )
    out = simulate(env, 2)
    pushes = re.findall(r"push  base \d+ -> version \d+ \(int8, (\d+) bytes", out)
    assert len(pushes) == 2 and all(int(n) < 797_000 / 3.9 for n in pushes)
    final = checkpoints.load_newest(tmp_path / "models")
    assert final.version == 2 and int(final.metadata["samples"]) == 6000
    entries = history.read(tmp_path / "models")
    assert entries[-1]["version"] == 2 and entries[-1]["accuracy"] > entries[0]["accuracy"]


@pytest.mark.slow
def test_topk_rounds_from_real_workers_keep_residuals_per_client(tmp_path, mnist_dir):
    # 6 iid clients of 10,000 images, 3 a round for 2 rounds, the top 1% with error feedback.
    env = environment(
        tmp_path,
        mnist_dir,
        PARTITION="iid",
        NUM_CLIENTS="6",
        CLIENTS_PER_ROUND="3",
        AGGREGATION="fedavg",
        ROUNDS="2",
        EPOCHS="1",
        COMPRESSION="topk",
    )
    out = simulate(env, 2)
    assert len(re.findall(r"push  base \d+ -> version \d+ \(topk16, \d+ bytes", out)) == 6
    assert re.search(r"round 2 closed \(all sampled clients\): 3 of 3 sampled clients", out)
    assert checkpoints.load_newest(tmp_path / "models").version == 2
    residuals = sorted(p.stem for p in (tmp_path / "models" / "worker-state").iterdir())
    trained = {c for e in history.read(tmp_path / "models")[1:] for c in e["clients"]}
    assert residuals == sorted(trained)


ROUNDS_VIRTUAL = {  # lognormal speeds, 6 asked for 4 a round, closed at the first 4
    "NUM_CLIENTS": "20",
    "CLIENTS_PER_ROUND": "4",
    "OVERSELECT": "1.5",
    "AGGREGATION": "fedavg",
    "ROUNDS": "3",
    "CLIENT_SPEED": "lognormal:0,0.5",
}
FEDBUFF_VIRTUAL = {  # 3 clients in flight, 12 updates of 30 clients (2,000 images), 2 a version
    "NUM_CLIENTS": "30",
    "CLIENTS_PER_ROUND": "3",
    "AGGREGATION": "fedbuff",
    "FEDBUFF_K": "2",
    "ROUNDS": "4",
    "EVAL_EVERY": "2",
    "CLIENT_SPEED": "slow:0.1,10",  # a tenth 10x slower
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rule", "versions", "rounds", "clients"),
    [
        (ROUNDS_VIRTUAL, [0, 1, 2, 3], [None, 1, 2, 3], 4),
        (FEDBUFF_VIRTUAL, [0, 2, 4, 6], [None] * 4, None),
    ],
    ids=["rounds", "fedbuff"],
)
def test_the_virtual_clock_gives_the_same_history_on_one_and_two_workers(
    tmp_path, mnist_dir, rule, versions, rounds, clients
):
    runs = []
    for workers in (1, 2):
        folder = tmp_path / f"w{workers}"
        env = environment(folder, mnist_dir, PARTITION="iid", EPOCHS="1", CLOCK="virtual", **rule)
        simulate(env, workers)
        entries = history.read(folder / "models")
        runs.append([(e["version"], e["round"], e["clients"], e["sim_seconds"]) for e in entries])
    assert [r[0] for r in runs[0]] == versions and [r[1] for r in runs[0]] == rounds
    # every scored version after v0 names its clients (a round: exactly its CLIENTS_PER_ROUND)
    assert all(len(r[2]) == clients if clients else r[2] for r in runs[0][1:])
    assert runs[1] == runs[0]
