#!/usr/bin/env python3
"""Measure fedsim on a single-node Docker Swarm beside Docker Compose, same images.

    scripts/bench_swarm.py [--workers 3] [--repeat 1] [--data DIR]

Builds the images first (not timed). Then, with the code's default settings (a
copy of the project without `.env`, MNIST from --data), a free host port and a
fresh checkpoint volume, it times:
  - Compose: `docker compose up -d --scale client=N` (project fedsim-bench-compose),
  - Swarm: `scripts/swarm.sh up --no-build` with WORKERS=N (stack fedsim-bench-swarm),
each from the start of the command to the first aggregated update (version 1),
to the end of the run (/v1/status says finished) and to the last worker's exit.
During each run it samples `docker stats --no-stream` and reports the largest
memory seen per service (for a worker: the largest of the replicas), and the
1-minute load average when each run starts. With --repeat N it makes N runs of
each, alternating which goes first. Removes what it started, every profile's
containers, networks and volumes included. Needs a swarm manager (`docker swarm
init`). Refuses to start above a load of 1.0 unless --force. Prints numbers; it
is not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from benchlib import ROOT, Bench, add_arguments, free_port
from benchlib.docker import COMPOSE_RESET, clean_env, copy_project, mnist_files, status

RUN_TIMEOUT = 1800.0
UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "kB": 1e3, "MB": 1e6, "GB": 1e9}


def mem_bytes(usage: str) -> float:
    """'123.4MiB / 23.5GiB' -> bytes of the first figure."""
    match = re.match(r"\s*([\d.]+)\s*([A-Za-z]+)", usage)
    return float(match.group(1)) * UNITS.get(match.group(2), 1) if match else 0.0


class MemorySampler(threading.Thread):
    """Largest memory per service, from `docker stats --no-stream`, until stopped."""

    def __init__(self, label: str, service_of: Callable[[dict[str, str]], str]) -> None:
        super().__init__(daemon=True)
        self.label, self.service_of = label, service_of
        self.peak: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            # A container that went meanwhile spoils one sample, not the run.
            with contextlib.suppress(OSError, ValueError, KeyError):
                self.sample()
            self.stop.wait(1.0)

    def sample(self) -> None:
        ids = subprocess.run(
            ["docker", "ps", "-q", "--filter", f"label={self.label}"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        if not ids:
            return
        labels = {}
        inspected = subprocess.run(
            ["docker", "inspect", "-f", "{{.Id}} {{json .Config.Labels}}", *ids],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        for line in inspected.splitlines():
            cid, _, raw = line.partition(" ")
            labels[cid[:12]] = json.loads(raw)
        stats = subprocess.run(
            ["docker", "stats", "--no-stream", "--format", "{{json .}}", *labels],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        for line in stats.splitlines():
            row = json.loads(line)
            service = self.service_of(labels.get(row["ID"][:12], {}))
            if service:
                used = mem_bytes(row["MemUsage"])
                self.peak[service] = max(self.peak.get(service, 0.0), used)


def timed_run(
    up: list[str],
    down: list[str],
    cwd: Path,
    env: dict[str, str],
    port: int,
    workers_left: Callable[[], int],
    sampler: MemorySampler,
) -> dict:
    """Seconds from `up` to the command's return, to version 1, to finished, and to no
    worker left running; the final status and the memory seen. `down` runs at the end."""
    t0 = time.monotonic()
    sampler.start()
    marks: dict[str, float] = {}
    try:
        proc = subprocess.Popen(
            up, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        while "exited" not in marks:
            now = time.monotonic() - t0
            if now > RUN_TIMEOUT:
                raise SystemExit(f"bench_swarm: the run did not end in {RUN_TIMEOUT:.0f} s")
            if proc.poll() is not None and "command" not in marks:
                if proc.returncode != 0:
                    raise SystemExit(f"bench_swarm: {proc.args} failed:\n{proc.stdout.read()}")
                marks["command"] = now
            s = status(port)
            if s is not None:
                if s["version"] >= 1:
                    marks.setdefault("first", now)
                if s["finished"]:
                    marks.setdefault("finished", now)
            if "finished" in marks and "command" in marks and workers_left() == 0:
                marks["exited"] = now
            time.sleep(0.25)
        return {"marks": marks, "status": status(port), "memory": sampler.peak}
    finally:
        sampler.stop.set()
        sampler.join()
        subprocess.run(down, cwd=cwd, env=env, capture_output=True, check=False)


def count(argv: list[str], **kwargs) -> int:
    """How many ids a `docker ... -q` command lists."""
    done = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)
    return len(done.stdout.split())


def run_compose(project: Path, workers: int) -> dict:
    """One default run under Docker Compose, removed afterwards."""
    port = free_port()
    env = clean_env(AGGREGATOR_PORT=str(port))
    base = ["docker", "compose", "-p", "fedsim-bench-compose"]
    sampler = MemorySampler(
        "com.docker.compose.project=fedsim-bench-compose",
        lambda labels: labels.get("com.docker.compose.service", ""),
    )
    return timed_run(
        [*base, "up", "-d", "--scale", f"client={workers}"],
        [*base, *COMPOSE_RESET, "--timeout", "30"],
        project,
        env,
        port,
        lambda: count([*base, "ps", "-q", "--status", "running", "client"], cwd=project, env=env),
        sampler,
    )


def run_swarm(project: Path, workers: int) -> dict:
    """One default run as a stack (scripts/swarm.sh), removed afterwards."""
    port = free_port()
    stack = "fedsim-bench-swarm"
    env = clean_env(AGGREGATOR_PORT=str(port), STACK=stack, WORKERS=str(workers))
    label = f"label=com.docker.swarm.service.name={stack}_client"
    sampler = MemorySampler(
        f"com.docker.stack.namespace={stack}",
        lambda labels: labels.get("com.docker.swarm.service.name", "").removeprefix(stack + "_"),
    )
    return timed_run(
        ["scripts/swarm.sh", "up", "--no-build"],
        ["scripts/swarm.sh", "down", "--volumes"],
        project,
        env,
        port,
        lambda: count(["docker", "ps", "-q", "--filter", label]),
        sampler,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each, alternating")
    parser.add_argument("--data", type=Path, default=ROOT / "data", help="the MNIST files")
    add_arguments(parser)
    args = parser.parse_args()

    found = mnist_files(args.data)
    if not all(found.values()):
        missing = [n for n, p in found.items() if p is None]
        print(f"bench_swarm: put the MNIST files {missing} in {args.data} first", file=sys.stderr)
        return 1
    node = subprocess.run(
        ["docker", "info", "-f", "{{.Swarm.ControlAvailable}}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if node != "true":
        print("bench_swarm: not a swarm manager: run `docker swarm init` first", file=sys.stderr)
        return 1
    bench = Bench.from_args("bench_swarm", args)
    bench.header()

    runs: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory(prefix="fedsim-bench-") as tmp:
        project = Path(tmp)
        copy_project(project)
        for path in found.values():
            shutil.copyfile(path, project / "data" / path.name)

        print("building the images (not timed) ...", flush=True)
        subprocess.run(["docker", "compose", "build", "--quiet"], cwd=project, check=True)
        order = [("compose", run_compose), ("swarm", run_swarm)]
        for i in range(args.repeat):
            for name, run in order if i % 2 == 0 else order[::-1]:
                print(f"{name}: run {i + 1} with {args.workers} workers ...", flush=True)
                load = bench.load()  # other jobs on the machine stretch every time
                runs.append((name, bench.figure(run(project, args.workers), load)))

    print()
    print(
        f"default settings, {args.workers} workers, {os.cpu_count()} CPUs; seconds from the command"
    )
    print(
        f"{'':10} {'command':>8} {'1st update':>11} {'finished':>9} {'exited':>8} "
        f"{'updates':>8} {'load':>5}"
    )
    for name, r in runs:
        m, s = r["marks"], r["status"] or {}
        bench.say(
            f"{name:10} {m.get('command', 0):7.1f}s {m.get('first', 0):10.1f}s "
            f"{m.get('finished', 0):8.1f}s {m.get('exited', 0):7.1f}s {s.get('updates', '?'):>8} "
            f"{r['load']:5.1f}",
            r["load"],
        )
    print()
    print("largest memory seen (docker stats; a worker: the largest replica)")
    for name, r in runs:
        seen = sorted((svc, b) for svc, b in r["memory"].items() if b >= 2**20)
        bench.say(
            f"{name:10} " + ", ".join(f"{svc} {b / 2**20:.0f} MiB" for svc, b in seen), r["load"]
        )
    bench.finish([{"kind": name, **r} for name, r in runs])
    return 0


if __name__ == "__main__":
    sys.exit(main())
