#!/usr/bin/env python3
"""Test accuracy and wall time of whole local runs (scripts/simulate.sh), printed.

    scripts/bench_accuracy.py                      every scenario: default, fedavg, fedasync, flower
    scripts/bench_accuracy.py default --set EPOCHS=10 --set BATCH_SIZE=64
                                                   one scenario with other settings

Each run gets a fresh MODEL_DIR and its own port; settings not given keep the
code's defaults (a .env is not read). A benchmark, not a test: it measures and
prints, it does not gate anything.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {
    # The default run: 3 clients on 1-4, 5-8, 9-12, mlp, async-weighted, one pass.
    "default": {},
    # Synchronous rounds: one slice per client per round, 10 rounds.
    "fedavg": {"AGGREGATION": "fedavg", "ROUNDS": "10"},
    # FedAsync on the default run: one pass, each update mixed in at
    # FEDASYNC_ALPHA * (staleness + 1) ** -FEDASYNC_STALENESS.
    "fedasync": {"AGGREGATION": "fedasync"},
    # The workload Flower 1.42 was measured on here: 3 clients, the same MLP, one
    # epoch per 5,000-image slice, 4 FedAvg rounds (50.7 s and 3.2 GB in its
    # simulation engine, 85.8 s and 4.9 GB as separate processes).
    "flower": {"AGGREGATION": "fedavg", "ROUNDS": "4", "EPOCHS": "1"},
}
# The original system: 95.03% test accuracy in 166.8 s with the default run.
ORIGINAL = (0.9503, 166.8)


def data_dir() -> str:
    for candidate in (
        os.environ.get("DATA_DIR"),
        os.environ.get("FEDSIM_TEST_MNIST"),
        ROOT / "data",
        ROOT.parent / "shared" / "mnist",
    ):
        if candidate and (Path(candidate) / "t10k-labels-idx1-ubyte.gz").is_file():
            return str(candidate)
    sys.exit("bench_accuracy: no MNIST files found; set DATA_DIR")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss(root: int) -> int:
    """Resident bytes of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        pid = int(entry.name)
        children.setdefault(int(fields["PPid"]), []).append(pid)
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def run(name: str, overrides: dict[str, str], clients: int) -> dict[str, object]:
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
            [str(ROOT / "scripts" / "simulate.sh"), "--clients", str(clients)],
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
        # Training time: from the aggregator answering to the last client's summary.
        client_seconds = [float(s) for s in re.findall(r" done: .*, ([\d.]+)s$", sim.stdout, re.M)]
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
        "slowest_client_seconds": max(client_seconds, default=0.0),
        "peak_rss_bytes": peak[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "scenarios", nargs="*", help=f"some of {', '.join(SCENARIOS)} (default: all)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.set)
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; known: {', '.join(SCENARIOS)}")

    print(f"machine: {os.cpu_count()} cores; original: {ORIGINAL[0]:.2%} in {ORIGINAL[1]} s")
    results = []
    for name in args.scenarios or SCENARIOS:
        overrides = {**SCENARIOS[name], **extra}
        result = run(name, overrides, args.clients)
        results.append(result)
        shown = " ".join(f"{k}={v}" for k, v in overrides.items()) or "defaults"
        print(
            f"{name:8} {shown:40} accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}  "
            f"version {result['version']}  wall {result['wall_seconds']:.1f}s  "
            f"(slowest client {result['slowest_client_seconds']:.1f}s)  "
            f"peak memory {result['peak_rss_bytes'] / 2**30:.2f} GB",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
