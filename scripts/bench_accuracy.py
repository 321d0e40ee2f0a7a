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

from benchlib import ROOT, Bench, add_arguments, child_json, key_values, local_run

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
    with local_run(overrides, workers, prefix="fedsim-bench-", every=0.2) as sim:
        sim.proc.wait()
        wall = sim.seconds()
        output = sim.output()
        if sim.proc.returncode != 0:
            print(output[-5000:], file=sys.stderr)
            raise SystemExit(f"bench_accuracy: {name}: simulate.sh exited {sim.proc.returncode}")
        # Each worker's time, from its start to its summary line.
        worker_seconds = [float(s) for s in re.findall(r" done: .*, ([\d.]+)s$", output, re.M)]
        report_path = sim.log.with_name("report.json")
        subprocess.run(
            [str(ROOT / "scripts" / "evaluate.sh"), "--local", "--json", str(report_path)],
            env=sim.env,
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
        "wall_seconds": wall,
        "workers": workers,
        "slowest_worker_seconds": max(worker_seconds, default=0.0),
        # Peak memory of the whole run: every process simulate.sh starts, summed.
        "peak_rss_bytes": sim.memory.peak,
        "load_before": round(load, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


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
    add_arguments(parser)
    args = parser.parse_args()
    if args.clients is not None and args.clients < 1:
        parser.error(f"--clients must be at least 1, got {args.clients}")
    extra = key_values(parser, args.set)
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; known: {', '.join(SCENARIOS)}")

    bench = Bench.from_args("bench_accuracy", args)
    bench.header()
    print(f"original: {ORIGINAL[0]:.2%} in {ORIGINAL[1]} s")
    results: list[dict[str, object]] = []
    for name in args.scenarios or DEFAULT_SCENARIOS:
        settings, workers = SCENARIOS[name]
        overrides = {**settings, **extra}
        result = run(name, overrides, args.clients or workers)
        results.append(bench.figure(result, result["load_before"]))
        shown = " ".join(f"{k}={v}" for k, v in overrides.items()) or "defaults"
        bench.say(
            f"{name:12} {shown:80} workers {result['workers']}  "
            f"accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}  "
            f"version {result['version']}  wall {result['wall_seconds']:.1f}s  "
            f"(slowest worker {result['slowest_worker_seconds']:.1f}s)  "
            f"peak memory {result['peak_rss_bytes'] / 2**30:.2f} GB  "
            f"load {result['load_before']:.1f}-{result['load_after']:.1f}",
            result["load_before"],
        )
    w1_runs = [r for r in results if str(r["scenario"]).startswith("w1")]
    if w1_runs and not args.no_keras:
        keras = child_json("bench_keras.py", "w1", *bench.child_args())["results"]
        bench.say(
            f"plain Keras, W1's training in one process: {keras['process_seconds']:.1f}s "
            f"from process start ({keras['train_seconds']:.1f}s training), "
            f"accuracy {keras['accuracy']:.4f}, load {keras['load']:.1f}",
            keras["load"],
        )
        for r in w1_runs:
            bench.say(
                f"{r['scenario']:12} {r['wall_seconds']:.1f}s / {keras['process_seconds']:.1f}s"
                f" = {r['wall_seconds'] / keras['process_seconds']:.2f}x plain Keras (aim 1.3x)"
            )
        results.append({"scenario": "keras-w1", **keras})
    bench.finish(results)


if __name__ == "__main__":
    main()
