#!/usr/bin/env python3
"""What grows with the number of logical clients, without training (issue 18's 10,000).

For each NUM_CLIENTS (PARTITION=iid: 60,000 / N images each), in a fresh folder:

  - prepare's seconds (`python -m fedsim.prepare`, a process, Python's start-up included),
  - the bytes of partitions.json and clients.json,
  - the aggregator's resident memory (VmRSS) before and after it loads the plan and the
    population and builds its state, as the app does (`create_app`, in a fresh process),
    and the bytes of the plan it holds (the roster's columns),
  - a checkpoint's bytes, written mid-round (a round open, its sample saved),
  - the bytes of GET /v1/status and of one page of GET /v1/history (?limit=10) over a
    history of ROUNDS entries of C clients each, as a run of ROUNDS rounds leaves, and
    the whole history's bytes beside it, with the seconds /v1/status took.

    .venv/bin/python scripts/bench_scale.py [--clients 100 1000 10000] [--per-round 100]
        [--rounds 100] [--data ./data] [--population lognormal:0,0.5] [--json FILE]

It needs MNIST in --data (prepare verifies it) and no TensorFlow. Refuses to start above
a load of 1.0 unless --force. A benchmark, not a test: it gates nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import ROOT, Bench, add_arguments

CLIENT_SIZES = (100, 1_000, 10_000)
HISTORY_PAGE = 10  # the entries of the /v1/history page measured


def environment(folder: Path, n: int, per_round: int, rounds: int, data: Path, speed: str):
    """The settings of one size's run, as .env would give them."""
    return {
        "DATA_DIR": str(data),
        "MODEL_DIR": str(folder / "models"),
        "TOKENS_FILE": str(folder / "secrets" / "tokens.json"),
        "FEDSIM_ENV_FILE": str(folder / "no.env"),
        "MODEL": "mlp",
        "PARTITION": "iid",
        "NUM_CLIENTS": str(n),
        "CLIENTS_PER_ROUND": str(min(per_round, n)),
        "AGGREGATION": "fedavg",
        "ROUNDS": str(rounds),
        "CLIENT_SPEED": speed,
    }


def rss_bytes() -> int:
    """This process's resident memory now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure_aggregator(env: dict[str, str], rounds: int) -> dict[str, Any]:
    """In this (fresh) process: the aggregator's state built as the app builds it, its
    memory, a checkpoint mid-round and the answers' bytes."""
    from fedsim import config
    from fedsim.aggregator import persistence
    from fedsim.aggregator.app import create_app

    settings = config.load(environ=env, env_file=Path(env["FEDSIM_ENV_FILE"]))
    before = rss_bytes()
    app = create_app({"FEDSIM_SETTINGS": settings, "FEDSIM_TICKER": False})
    after = rss_bytes()
    state = app.extensions["fedsim"]
    plan_bytes = persistence.load_plan(settings)[1].nbytes  # the roster the state holds
    state.ask("bench-worker")  # a round opens: a checkpoint now saves its sample
    state.saver.changed(time.monotonic(), held=True)
    checkpoint = state.save_if_due(force=True)
    # A history as ROUNDS rounds of C clients leave it, in memory where GET reads it.
    per_round, n = settings.per_round, settings.logical_clients
    state.evaluations.entries = [
        {
            "version": v,
            "round": v,
            "time": "2026-01-01T00:00:00+00:00",
            "sim_seconds": float(v),
            "accuracy": 0.9,
            "loss": 0.3,
            "samples": v * per_round * 60,
            "updates": v * per_round,
            "clients": [f"client-{(v * per_round + i) % n + 1}" for i in range(per_round)],
        }
        for v in range(rounds + 1)
    ]
    web = app.test_client()
    started = time.perf_counter()
    status = web.get("/v1/status")
    status_seconds = time.perf_counter() - started
    page = web.get(f"/v1/history?after={rounds - HISTORY_PAGE}&limit={HISTORY_PAGE}")
    whole = web.get("/v1/history")
    for answer in (status, page, whole):
        if answer.status_code != 200:
            raise RuntimeError(f"{answer.request.path}: {answer.status_code} {answer.data[:200]}")
    return {
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "rss_state_bytes": after - before,
        "plan_held_bytes": plan_bytes,
        "checkpoint_bytes": checkpoint.stat().st_size if checkpoint else None,
        "status_bytes": len(status.data),
        "status_rows": len(status.get_json()["clients"]),  # at most 500 (?clients=)
        "status_seconds": round(status_seconds, 4),
        "history_page_bytes": len(page.data),
        "history_bytes": len(whole.data),
    }


def measure(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One size: prepare in a process, then the aggregator in a fresh one."""
    with tempfile.TemporaryDirectory(prefix=f"fedsim-scale-{n}-") as tmp:
        folder = Path(tmp)
        env = environment(folder, n, args.per_round, args.rounds, args.data, args.population)
        full = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "services"), **env}
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "fedsim.prepare"], env=full, capture_output=True, text=True
        )
        prepare_seconds = time.perf_counter() - started
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
            raise SystemExit(f"bench_scale: prepare failed for {n} clients: {' '.join(tail)}")
        models = folder / "models"
        one = subprocess.run(
            [sys.executable, __file__, "--one", json.dumps({"env": env, "rounds": args.rounds})],
            env=full,
            capture_output=True,
            text=True,
        )
        if one.returncode != 0:
            raise SystemExit(f"bench_scale: the aggregator failed for {n} clients:\n{one.stderr}")
        return {
            "clients": n,
            "per_round": min(args.per_round, n),
            "prepare_seconds": round(prepare_seconds, 3),
            "partitions_json_bytes": (models / "partitions.json").stat().st_size,
            "clients_json_bytes": (models / "clients.json").stat().st_size,
            **json.loads(one.stdout.strip().splitlines()[-1]),
        }


COLUMNS = (
    ("clients", "clients"),
    ("prepare_seconds", "prepare s"),
    ("partitions_json_bytes", "partitions.json"),
    ("clients_json_bytes", "clients.json"),
    ("rss_state_bytes", "state RSS"),
    ("plan_held_bytes", "plan held"),
    ("checkpoint_bytes", "checkpoint"),
    ("status_bytes", "/v1/status"),
    ("history_page_bytes", f"history page ({HISTORY_PAGE})"),
    ("history_bytes", "whole history"),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=list(CLIENT_SIZES))
    parser.add_argument("--per-round", type=int, default=100, help="CLIENTS_PER_ROUND")
    parser.add_argument("--rounds", type=int, default=100, help="ROUNDS, and history entries")
    parser.add_argument("--data", type=Path, default=ROOT / "data", help="MNIST's folder")
    parser.add_argument("--population", default="1", help="CLIENT_SPEED (e.g. lognormal:0,0.5)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child: one aggregator
    add_arguments(parser)
    args = parser.parse_args()
    if args.one is not None:
        job = json.loads(args.one)
        print(json.dumps(measure_aggregator(job["env"], job["rounds"])))
        return 0
    if args.rounds < HISTORY_PAGE:
        parser.error(f"--rounds must be at least {HISTORY_PAGE}, the history page measured")
    bench = Bench.from_args("bench_scale", args)
    bench.header()
    results = []
    for n in args.clients:
        row = measure(n, args)
        results.append(bench.figure(row))
        bench.say("  ".join(f"{label} {row[key]}" for key, label in COLUMNS))
    bench.finish(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
