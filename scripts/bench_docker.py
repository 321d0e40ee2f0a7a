#!/usr/bin/env python3
"""Measure the Docker Compose simulation: image sizes and the default run's timings.

    scripts/bench_docker.py [--clients 3]

Builds the images first (not timed), then times a warm
`docker compose up -d --scale client=3` with the code's default settings (no
`.env` is read) on a fresh `models` volume, under its own project name and a
free host port:
  - up to the first aggregated update (the aggregator's version reaches 1),
  - up to the end of the run (every client container has exited).
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
            print(f"clients                    {args.clients} (exit codes {codes})")
            bench.say(f"up -> first aggregated update {first:6.1f} s", load)
            bench.say(f"up -> all clients exited      {end:6.1f} s", load)
            print(
                f"final version {final.get('version')}, {final.get('samples')} samples, "
                f"strategy {final.get('strategy')}"
            )
            results["run"] = bench.figure(
                {"clients": args.clients, "first_update_seconds": first, "exited_seconds": end},
                load,
            )
        finally:
            compose(*COMPOSE_RESET, "--timeout", "20")
    bench.finish(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
