#!/usr/bin/env python3
"""Test accuracy, wall time and memory of whole local runs (scripts/simulate.sh), printed.

    scripts/bench_accuracy.py                      default, w1 (3, 2 and 1 workers), then
                                                   plain Keras doing W1's training
    scripts/bench_accuracy.py default --set EPOCHS=10 --set BATCH_SIZE=64
                                                   one scenario with other settings
    scripts/bench_accuracy.py w1 --clients 2       a scenario on another number of workers

`--clients N` is the number of worker processes (simulate.sh's); each scenario
has its own default. Each run gets a fresh MODEL_DIR and its own port; settings
not given keep the code's defaults (a .env is not read). A benchmark, not a
test: it measures and prints, it does not gate anything.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, data_dir, free_port, tree_rss

# Flower's W1 workload, which Flower 1.42 was measured on here: 3 logical clients
# (the default slices 1-4, 5-8, 9-12), the mlp, Adam at 0.001, one epoch of one
# 5,000-image slice per client per round, 4 FedAvg rounds (50.7 s and 3.2 GB in
# its simulation engine, 85.8 s and 4.9 GB as separate processes).
W1 = {
    "AGGREGATION": "fedavg",
    "ROUNDS": "4",
    "EPOCHS": "1",
    "OPTIMIZER": "adam",
    "LEARNING_RATE": "0.001",
}
# name -> (settings, worker processes)
SCENARIOS: dict[str, tuple[dict[str, str], int]] = {
    # The default run: 3 logical clients on 1-4, 5-8, 9-12, mlp, async-weighted, one pass.
    "default": ({}, 3),
    # Synchronous rounds: one slice per client per round, 10 rounds.
    "fedavg": ({"AGGREGATION": "fedavg", "ROUNDS": "10"}, 3),
    # FedAsync on the default run: one pass, each update mixed in at
    # FEDASYNC_ALPHA * (staleness + 1) ** -FEDASYNC_STALENESS.
    "fedasync": ({"AGGREGATION": "fedasync"}, 3),
    # W1 with one worker per logical client, and with fewer workers training the
    # 3 logical clients as virtual clients (fewer TensorFlow start-ups).
    "w1": (W1, 3),
    "w1-2workers": (W1, 2),
    "w1-1worker": (W1, 1),
}
DEFAULT_SCENARIOS = ("default", "w1", "w1-2workers", "w1-1worker")
# The original system: 95.03% test accuracy in 166.8 s with the default run.
ORIGINAL = (0.9503, 166.8)


def run(name: str, overrides: dict[str, str], workers: int) -> dict[str, object]:
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fedsim-bench-") as tmp:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": tmp,
            "FEDSIM_ENV_FILE": str(Path(tmp) / "no.env"),
            "DATA_DIR": data_dir(),
            "MODEL_DIR": str(Path(tmp) / "models"),
            "AGGREGATOR_URL": f"http://127.0.0.1:{free_port()}",
            **overrides,
        }
        started = time.monotonic()
        proc = subprocess.Popen(
            [str(ROOT / "scripts" / "simulate.sh"), "--clients", str(workers)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Peak memory of the whole run: every process simulate.sh starts, summed.
        peak = [0]

        def sample() -> None:
            while proc.poll() is None:
                peak[0] = max(peak[0], tree_rss(proc.pid))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stdout, stderr = proc.communicate()
        sampler.join()
        sim = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        wall = time.monotonic() - started
        if sim.returncode != 0:
            print(sim.stdout[-3000:], sim.stderr[-2000:], sep="\n", file=sys.stderr)
            raise SystemExit(f"bench_accuracy: {name}: simulate.sh exited {sim.returncode}")
        # Each worker's time, from its start to its summary line.
        worker_seconds = [float(s) for s in re.findall(r" done: .*, ([\d.]+)s$", sim.stdout, re.M)]
        report_path = Path(tmp) / "report.json"
        subprocess.run(
            [str(ROOT / "scripts" / "evaluate.sh"), "--local", "--json", str(report_path)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        report = json.loads(report_path.read_text())
    return {
        "scenario": name,
        "settings": overrides,
        "accuracy": report["accuracy"],
        "loss": report["loss"],
        "version": report["version"],
        "samples": report["samples"],
        "wall_seconds": round(wall, 1),
        "workers": workers,
        "slowest_worker_seconds": max(worker_seconds, default=0.0),
        "peak_rss_bytes": peak[0],
        "load_before": round(load, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def keras_w1() -> dict[str, object]:
    """scripts/bench_keras.py w1 in its own process: W1's training in plain Keras."""
    python = ROOT / ".venv" / "bin" / "python"
    done = subprocess.run(
        [
            str(python if python.exists() else sys.executable),
            str(ROOT / "scripts" / "bench_keras.py"),
            "w1",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"bench_accuracy: bench_keras.py w1 failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "scenarios",
        nargs="*",
        help=f"some of {', '.join(SCENARIOS)} (default: {' '.join(DEFAULT_SCENARIOS)})",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--clients", type=int, help="worker processes of every run (default: per scenario)"
    )
    parser.add_argument(
        "--no-keras", action="store_true", help="skip plain Keras after a w1 scenario"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    bad = [item for item in args.set if "=" not in item]
    if bad:
        parser.error(f"--set takes KEY=VALUE, got {bad[0]!r}")
    if args.clients is not None and args.clients < 1:
        parser.error(f"--clients must be at least 1, got {args.clients}")
    extra = dict(item.split("=", 1) for item in args.set)
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; known: {', '.join(SCENARIOS)}")

    print(f"machine: {os.cpu_count()} cores; original: {ORIGINAL[0]:.2%} in {ORIGINAL[1]} s")
    results: list[dict[str, object]] = []
    for name in args.scenarios or DEFAULT_SCENARIOS:
        settings, workers = SCENARIOS[name]
        overrides = {**settings, **extra}
        result = run(name, overrides, args.clients or workers)
        results.append(result)
        shown = " ".join(f"{k}={v}" for k, v in overrides.items()) or "defaults"
        print(
            f"{name:12} {shown:80} workers {result['workers']}  "
            f"accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}  "
            f"version {result['version']}  wall {result['wall_seconds']:.1f}s  "
            f"(slowest worker {result['slowest_worker_seconds']:.1f}s)  "
            f"peak memory {result['peak_rss_bytes'] / 2**30:.2f} GB  "
            f"load {result['load_before']:.1f}-{result['load_after']:.1f}",
            flush=True,
        )
    w1_runs = [r for r in results if str(r["scenario"]).startswith("w1")]
    if w1_runs and not args.no_keras:
        keras = keras_w1()
        print(
            f"plain Keras, W1's training in one process: {keras['process_seconds']:.1f}s "
            f"from process start ({keras['train_seconds']:.1f}s training), "
            f"accuracy {keras['accuracy']:.4f}, load {keras['load_1min']:.1f}",
            flush=True,
        )
        for r in w1_runs:
            print(
                f"{r['scenario']:12} {r['wall_seconds']:.1f}s / {keras['process_seconds']:.1f}s"
                f" = {r['wall_seconds'] / keras['process_seconds']:.2f}x plain Keras (aim 1.3x)"
            )
        results.append({"scenario": "keras-w1", **keras})
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
