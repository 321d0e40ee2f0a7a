#!/usr/bin/env python3
"""Where a run's memory goes outside training (issue 18's W2 growth): the aggregator and
the workers' HTTP path, without TensorFlow.

The aggregator under gunicorn as the image runs it, and --workers processes running
fedsim's worker loop (fedsim.client.worker: asking for tasks, downloading versions, the
update pipeline, the outbox, uploading, scoring) with a stand-in learner in TensorFlow's
place: training returns the base weights plus seeded noise, scoring a fixed score. A
round then costs only what a real one does outside training. W2's settings by default:
McMahan's CNN, 100 iid clients, 10 a round, FedAvg. Prints the resident memory (VmRSS)
of the aggregator's worker process and of each worker every --every rounds, each one's
growth from round --from to the last (medians of up to 5 readings at each end, as the
experiment runner reads it), and the aggregator's peak (VmHWM).

    .venv/bin/python scripts/profile_run_memory.py [--model cnn] [--rounds 60] [--workers 2]

Compare allocators by running it under them, e.g. `MALLOC_ARENA_MAX=2` or
`LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 MALLOC_CONF=narenas:1` (the
aggregator's image's): every process inherits it, and
the allocator in use is printed. Refuses to start above a load of 1.0 unless --force. A
benchmark, not a test: it gates nothing. scripts/profile_worker_memory.py measures the
training loop alone.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import requests

from benchlib import Bench, add_arguments, allocator, rss_bytes, serve, vm_hwm_kib
from benchlib.procs import children
from fedsim.experiment.outcome import median_growth


class StandIn:
    """A learner without TensorFlow: new weights near the base (as training returns new
    arrays), a fixed score."""

    def __init__(self) -> None:
        self.labels = serve.LABELS
        self.rng = np.random.default_rng(1)

    def train(self, tensors: Mapping[str, np.ndarray], indices, settings, seed, *, labels=None):
        from fedsim.client.training import Trained

        out = {
            name: (t + 0.001 * self.rng.standard_normal(t.shape)).astype(np.float32)
            for name, t in tensors.items()
        }
        return out, Trained(len(indices), 0.5, 0.9, 0.0)

    def evaluate(self, tensors: Mapping[str, np.ndarray]) -> tuple[float, float, float]:
        return 0.9, 0.5, 0.0  # accuracy, loss, seconds


def as_worker() -> int:
    """One worker process (the settings come from the environment the parent set)."""
    from fedsim import cli, config, tokens
    from fedsim.client import transport, worker

    cli.setup_logging()
    settings = config.load()
    link = transport.Transport(
        settings.aggregator_url,
        policy=transport.RetryPolicy(settings.max_retry, settings.max_wait),
        timeout=settings.http_timeout,
        token=tokens.workers_secret(settings.tokens_file),
    )
    try:
        worker.Worker(settings, link, lambda n: StandIn()).run()
    finally:
        link.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn", choices=["cnn", "mlp"])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=100, help="NUM_CLIENTS")
    parser.add_argument("--per-round", type=int, default=10, help="CLIENTS_PER_ROUND")
    parser.add_argument("--threads", type=int, default=8, help="the aggregator's THREADS")
    parser.add_argument("--every", type=int, default=5, help="print memory every N rounds")
    parser.add_argument("--from", dest="start", type=int, default=5, help="growth from round")
    parser.add_argument("--as-worker", action="store_true", help=argparse.SUPPRESS)
    add_arguments(parser)
    args = parser.parse_args()
    if args.as_worker:
        return as_worker()
    if not 0 < args.start < args.rounds:
        parser.error(f"--from must be between 1 and --rounds - 1, got {args.start}")

    bench = Bench.from_args("profile_run_memory", args)
    bench.header()
    bench.say(
        f"allocator: {allocator()}; {args.model}, {args.clients} iid clients, "
        f"{args.per_round} a round, {args.rounds} rounds, {args.workers} workers"
    )
    samples: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="fedsim-profile-") as name:
        tmp = Path(name)
        env = serve.stand_in(
            tmp,
            args.model,
            PARTITION="iid",
            NUM_CLIENTS=str(args.clients),
            CLIENTS_PER_ROUND=str(args.per_round),
            AGGREGATION="fedavg",
            ROUNDS=str(args.rounds),
        )
        headers = serve.workers_header(env)
        proc, url, log = serve.start_gunicorn(tmp, env, args.threads)
        workers: list[subprocess.Popen] = []
        try:
            serve.wait_healthy(url, proc, log)
            aggregator = children(proc.pid)[0]
            script = str(Path(__file__).resolve())
            for k in range(args.workers):
                out = (tmp / f"worker-{k + 1}.log").open("wb")
                workers.append(
                    subprocess.Popen(
                        [sys.executable, script, "--as-worker"],
                        env={**os.environ, **env, "AGGREGATOR_URL": url},
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        cwd=tmp,
                    )
                )
            started, seen = time.monotonic(), 0
            last = [0] * len(workers)  # a worker's last reading: it exits after the last round
            while True:
                last = [rss_bytes(w.pid) or before for w, before in zip(workers, last, strict=True)]
                answer = requests.get(url + "/v1/status?clients=0", headers=headers, timeout=30)
                closed = int(answer.json()["round"]["rounds_done"])
                if closed > seen:  # one sample per look: rounds closed in between share it
                    seen = closed
                    sample = {
                        "round": seen,
                        "seconds": round(time.monotonic() - started, 2),
                        "aggregator_rss_bytes": rss_bytes(aggregator),
                        "worker_rss_bytes": list(last),
                    }
                    samples.append(sample)
                    if seen % args.every == 0 or seen == args.rounds:
                        mib = " ".join(f"{b / 2**20:7.1f}" for b in last)
                        agg = sample["aggregator_rss_bytes"] / 2**20
                        bench.say(f"round {seen:4d}  aggregator {agg:7.1f} MiB  workers {mib} MiB")
                if seen >= args.rounds or all(w.poll() is not None for w in workers):
                    break
                time.sleep(0.1)
            for w in workers:
                w.wait(timeout=120)
            try:  # before it exits
                peak = vm_hwm_kib(aggregator) * 1024
            except (OSError, RuntimeError):  # gunicorn replaced its worker: see below
                peak = 0
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        failed = [k + 1 for k, w in enumerate(workers) if w.returncode]
        if failed or seen < args.rounds:
            for k in failed or range(len(workers)):
                print((tmp / f"worker-{k + 1}.log").read_text()[-2000:], file=sys.stderr)
            print(f"profile_run_memory: the run stopped at round {seen}", file=sys.stderr)
            return 1

    read = [s for s in samples if s["round"] >= args.start]
    first = read[0]

    def growth(key: str, k: int | None = None) -> int:
        """As the experiment runner reads a run's growth: medians at each end."""
        return median_growth([s[key] if k is None else s[key][k] for s in read]) or 0

    result = bench.figure(
        {
            "allocator": allocator(),
            "model": args.model,
            "rounds": args.rounds,
            "workers": args.workers,
            "aggregator_growth_bytes": growth("aggregator_rss_bytes"),
            "aggregator_peak_bytes": peak,
            "worker_growth_bytes": [growth("worker_rss_bytes", k) for k in range(args.workers)],
            "samples": samples,
        }
    )
    parts = [
        f"aggregator {growth('aggregator_rss_bytes') / 2**20:+.1f} MiB (peak {peak / 2**20:.1f})"
    ]
    parts += [
        f"worker {k + 1} {growth('worker_rss_bytes', k) / 2**20:+.1f} MiB"
        for k in range(args.workers)
    ]
    bench.say(f"growth from round {first['round']} to {seen}: {', '.join(parts)}; {allocator()}")
    bench.finish([result])
    return 0


if __name__ == "__main__":
    sys.exit(main())
