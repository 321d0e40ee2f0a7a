#!/usr/bin/env python3
"""Measure the Docker Compose simulation: image sizes and the default run's timings.

    scripts/bench_docker.py [--clients 3]

Builds the images first (not timed), then times a warm
`docker compose up -d --scale client=3` with the code's default settings (no
`.env` is read) on a fresh `models` volume, under its own project name and a
free host port:
  - up to the first aggregated update (the aggregator's version reaches 1), and
    from the first worker container's start to it (the start-up aim: 10 s),
  - up to the end of the run (every client container has exited),
  - `scripts/evaluate.sh` on the run's last checkpoint, twice (the aim: 5 s from
    the second time on, when nothing is left to build).
Reads the MNIST files from ./data. Removes its containers, networks and volume at
the end, every profile's included. Refuses to start above a load of 1.0 unless
--force. Prints numbers; it is not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime

from benchlib import ROOT, Bench, add_arguments, free_port
from benchlib.docker import COMPOSE_RESET, clean_env, mnist_files, status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    add_arguments(parser)
    args = parser.parse_args()

    folder = ROOT / "data"
    missing = [n for n, path in mnist_files(folder).items() if path is None]
    if missing:
        print(f"bench_docker: put the MNIST files {missing} in {folder} first", file=sys.stderr)
        return 1
    bench = Bench.from_args("bench_docker", args)
    bench.header()

    port = free_port()
    results: dict[str, object] = {}
    with tempfile.NamedTemporaryFile("w", suffix=".env") as empty_env:
        base = ["docker", "compose", "-p", "fedsim-bench", "--env-file", empty_env.name]
        env = clean_env(AGGREGATOR_PORT=str(port))

        def compose(*a: str, **kw) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*base, *a], cwd=ROOT, env=env, text=True, capture_output=True, **kw
            )

        print("building the images (not timed) ...", flush=True)
        compose("--profile", "tools", "build", check=True)
        for image in ("fedsim-aggregator:latest", "fedsim-client:latest"):
            size = subprocess.run(
                ["docker", "image", "inspect", "-f", "{{.Size}}", image],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            print(f"image {image:26} {int(size) / 1e6:8.0f} MB")
            results[image] = {"bytes": int(size)}

        compose(*COMPOSE_RESET)
        try:
            load = bench.load()
            t0 = time.monotonic()
            up = subprocess.Popen(
                [*base, "up", "-d", "--scale", f"client={args.clients}"],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            first = None
            while first is None:
                s = status(port)
                if s is not None and s["version"] >= 1:
                    first = time.monotonic() - t0
                    first_wall = time.time()
                elif time.monotonic() - t0 > 900:
                    raise SystemExit("bench_docker: no aggregated update in 15 minutes")
                else:
                    time.sleep(0.2)
            if up.wait() != 0:
                raise SystemExit("bench_docker: docker compose up failed")
            while True:
                ps = compose("ps", "-a", "--format", "json", "client").stdout
                states = [json.loads(line) for line in ps.splitlines() if line.strip()]
                if len(states) == args.clients and all(c["State"] == "exited" for c in states):
                    break
                time.sleep(0.5)
            end = time.monotonic() - t0
            final = status(port) or {}
            codes = [c["ExitCode"] for c in states]
            started = min(started_at(c["ID"]) for c in states)
            from_workers = first_wall - started
            print(f"clients                    {args.clients} (exit codes {codes})")
            bench.say(f"up -> first aggregated update {first:6.1f} s", load)
            bench.say(
                f"workers' start -> first aggregated update {from_workers:6.1f} s (aim 10 s)", load
            )
            bench.say(f"up -> all clients exited      {end:6.1f} s", load)
            evaluations = []
            for n in (1, 2):
                t = time.monotonic()
                subprocess.run(
                    [str(ROOT / "scripts" / "evaluate.sh"), "--json", "/reports/bench.json"],
                    cwd=ROOT,
                    env={
                        **env,
                        "COMPOSE_PROJECT_NAME": "fedsim-bench",
                        "COMPOSE_ENV_FILES": empty_env.name,
                    },
                    capture_output=True,
                    check=True,
                )
                evaluations.append(time.monotonic() - t)
                aim = " (aim 5 s)" if n == 2 else ""
                bench.say(f"scripts/evaluate.sh, time {n}         {evaluations[-1]:6.1f} s{aim}")
            print(
                f"final version {final.get('version')}, {final.get('samples')} samples, "
                f"strategy {final.get('strategy')}"
            )
            results["run"] = bench.figure(
                {
                    "clients": args.clients,
                    "first_update_seconds": first,
                    "workers_to_first_update_seconds": from_workers,
                    "exited_seconds": end,
                    "evaluate_seconds": evaluations,
                },
                load,
            )
        finally:
            compose(*COMPOSE_RESET, "--timeout", "20")
    bench.finish(results)
    return 0


def started_at(container: str) -> float:
    """When a container started, in seconds since the epoch (Docker's RFC 3339 time)."""
    raw = subprocess.run(
        ["docker", "inspect", "-f", "{{.State.StartedAt}}", container],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    whole, _, rest = raw.partition(".")  # nanoseconds: more digits than fromisoformat takes
    fraction = rest.rstrip("Z")[:6] or "0"
    return datetime.fromisoformat(f"{whole}.{fraction}+00:00").timestamp()


if __name__ == "__main__":
    raise SystemExit(main())
