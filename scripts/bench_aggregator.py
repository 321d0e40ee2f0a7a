#!/usr/bin/env python3
"""Benchmark the aggregator under a real gunicorn on 127.0.0.1 (mlp, async-weighted).

Measures and prints:
  - accepted updates per second with N concurrent uploaders (processes, keep-alive, each
    request with the workers' token), straight to gunicorn or, with --proxy, through the
    proxy (deploy/nginx, as Compose runs it), and the aggregator's CPU per update,
  - model downloads per second with N concurrent downloaders,
  - the aggregator worker's peak resident memory (VmHWM),
  - bytes on the wire per mlp update against its 796,840 bytes of float32 weights.

    .venv/bin/python scripts/bench_aggregator.py [--seconds 10] [--clients 8] [--threads 8]
        [--save-model 2] [--durable] [--proxy] [--profile FILE]

The uploads' line is also printed as `aggregator  N updates/s through the proxy with
tokens (aim 300/s)`. It writes a version-0 checkpoint of the mlp layout into a temporary
MODEL_DIR, so it needs neither TensorFlow nor MNIST (scripts/benchlib's stand-in); --proxy
needs nginx (Debian's package). It prints the 1-minute load at its start and refuses to
start above 1.0 unless --force. A benchmark, not a test: it gates nothing.
"""

from __future__ import annotations

import argparse
import pstats
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

from benchlib import Bench, add_arguments, cpu_seconds, serve, vm_hwm_kib
from benchlib.procs import children
from benchlib.profile import print_shares
from fedsim import checkpoints, weights
from fedsim.models import parameter_count

RAW_BYTES = parameter_count("mlp") * 4  # 796,840: the float32 weights alone
AIM = 300  # accepted updates per second through the proxy with tokens (issue 18)


def update_body(client: str, update_id: str, base_version: int = 0) -> bytes:
    """A realistic client upload: the metadata a client sends with 5,000 samples."""
    meta = {
        "client_id": client,
        "update_id": update_id,
        "base_version": base_version,
        "num_samples": 5000,
        "slice": 3,
        "slices": "1-4",
        "loss": 0.123456,
        "accuracy": 0.965432,
        "retries": 0,
    }
    return weights.encode(serve.mlp_weights(hash(client) % 1000), meta)


def worker_pid(master: int) -> int:
    for _ in range(100):
        found = children(master)
        if found:
            return found[0]
        time.sleep(0.1)
    raise RuntimeError("gunicorn started no worker")


def downloader(job: tuple[str, int, float]) -> tuple[int, int]:
    url, _, deadline = job
    session = requests.Session()
    ok = other = 0
    while time.time() < deadline:
        response = session.get(url + "/v1/model", timeout=30)
        if response.status_code == 200 and len(response.content) > RAW_BYTES:
            ok += 1
        else:
            other += 1
    return ok, other


def wire_bytes() -> dict[str, int]:
    body = update_body("client-1", uuid.uuid4().hex)
    header = weights.read_header(body)
    request = requests.Request(
        "POST",
        "http://aggregator:8080/v1/updates",
        data=body,
        headers={"Content-Type": "application/octet-stream"},
    )
    prepared = requests.Session().prepare_request(request)
    head = len(f"POST {prepared.path_url} HTTP/1.1\r\n") + sum(
        len(f"{k}: {v}\r\n") for k, v in prepared.headers.items()
    )
    head += len("Host: aggregator:8080\r\n\r\n")
    print(f"wire: mlp float32 weights        {RAW_BYTES:>9,} bytes")
    print(
        f"wire: safetensors body           {len(body):>9,} bytes "
        f"(+{len(body) - RAW_BYTES} = {100 * (len(body) / RAW_BYTES - 1):.3f}% over; "
        f"header {len(body) - RAW_BYTES - 8} bytes incl. {len(header['__metadata__'])} metadata keys)"
    )
    total = len(body) + head
    print(
        f"wire: body + HTTP request head   {total:>9,} bytes "
        f"(+{total - RAW_BYTES} = {100 * (total / RAW_BYTES - 1):.3f}% over)"
    )
    return {"raw_bytes": RAW_BYTES, "body_bytes": len(body), "request_bytes": total}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10, help="length of each phase")
    parser.add_argument("--clients", type=int, default=8, help="concurrent uploaders/downloaders")
    parser.add_argument("--threads", type=int, default=8, help="gunicorn threads")
    parser.add_argument("--save-model", type=int, default=2, help="SAVE_MODEL (default 2)")
    parser.add_argument(
        "--durable", action="store_true", help="DURABLE=true: acknowledge once in the journal"
    )
    parser.add_argument(
        "--proxy", action="store_true", help="through the proxy (nginx), as Compose runs it"
    )
    parser.add_argument(
        "--uploads-only", action="store_true", help="no downloads phase (e.g. for --profile)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="profile gunicorn's request threads (cProfile) into this file and print each "
        "upload step's share; the rates are then slowed by the profiler",
    )
    add_arguments(parser)
    args = parser.parse_args()
    if args.proxy and (missing := serve.nginx_missing()) is not None:
        print(missing, file=sys.stderr)
        return 1
    bench = Bench.from_args("bench_aggregator", args)
    bench.header()
    path = "through the proxy" if args.proxy else "straight to gunicorn"

    results: dict[str, object] = {"wire": wire_bytes()}  # sizes: no load to mark
    with tempfile.TemporaryDirectory(prefix="fedsim-bench-") as name:
        tmp = Path(name)
        env = serve.stand_in(tmp)
        env |= {"AGGREGATION": "async-weighted", "SAVE_MODEL": str(args.save_model)}
        env |= {"DURABLE": "true" if args.durable else "false"}
        headers = serve.workers_header(env)
        proc, url, log = serve.start_gunicorn(tmp, env, args.threads, args.profile)
        nginx = None
        try:
            serve.wait_healthy(url, proc, log)
            if args.proxy:
                nginx, url = serve.start_nginx(tmp, url)
                serve.wait_healthy(url, nginx, tmp / "nginx.log")
            worker = worker_pid(proc.pid)
            print(
                f"setup: gunicorn 1 worker x {args.threads} threads"
                f"{', behind nginx 1 worker (deploy/nginx)' if args.proxy else ''}, "
                f"SAVE_MODEL={args.save_model}, DURABLE={str(args.durable).lower()}, "
                f"{args.clients} client processes with the workers' token, "
                f"{args.seconds:g} s per phase; worker RSS at start {vm_hwm_kib(worker) / 1024:.0f} MiB"
            )
            secs = args.seconds
            load, cpu = bench.load(), cpu_seconds(worker)
            proxy_cpu = cpu_seconds(nginx.pid) if nginx else 0.0  # its master and worker
            body = update_body("client-1", "0" * serve.ID_WIDTH)
            ok, other = serve.for_seconds(
                serve.uploads, args.clients, secs, url, body, "", headers, ""
            )
            cpu_up = cpu_seconds(worker) - cpu
            status = requests.get(url + "/v1/status", timeout=10, headers=headers).json()
            per_update = 1000 * cpu_up / max(ok, 1)
            nginx_ms = ""
            if nginx is not None:
                proxy_cpu = 1000 * (cpu_seconds(nginx.pid) - proxy_cpu) / max(ok, 1)
                nginx_ms = f", nginx CPU {proxy_cpu:.2f} ms"
            bench.say(
                f"uploads {path}: {ok / secs:.0f} accepted updates/s ({ok} in {secs:g} s, "
                f"{other} not accepted; version {status['version']}, "
                f"last checkpoint v{status['last_checkpoint']['version']}); "
                f"aggregator CPU {per_update:.2f} ms per update{nginx_ms}",
                load,
            )
            bench.say(
                f"aggregator  {ok / secs:.0f} updates/s {path} with tokens (aim {AIM}/s)", load
            )
            results["uploads"] = bench.figure(
                {
                    "path": path,
                    "per_second": ok / secs,
                    "accepted": ok,
                    "other": other,
                    "cpu_ms": per_update,
                    "aim_per_second": AIM,
                },
                load,
            )
            if not args.uploads_only:
                load, cpu = bench.load(), cpu_seconds(worker)
                ok, other = serve.for_seconds(downloader, args.clients, secs, url)
                per_download = 1000 * (cpu_seconds(worker) - cpu) / max(ok, 1)
                bench.say(
                    f"downloads: {ok / secs:.0f} model downloads/s ({ok} in {secs:g} s, {other} failed); "
                    f"aggregator CPU {per_download:.2f} ms per download",
                    load,
                )
                results["downloads"] = bench.figure(
                    {"per_second": ok / secs, "ok": ok, "failed": other, "cpu_ms": per_download},
                    load,
                )
            peak = vm_hwm_kib(worker)
            bench.say(f"memory: aggregator worker peak RSS (VmHWM) {peak / 1024:.0f} MiB")
            results["memory"] = bench.figure({"worker_peak_kib": peak})
        finally:
            for server in (nginx, proc):
                if server is not None:
                    server.send_signal(signal.SIGTERM)
                    server.wait(timeout=60)
        saved = checkpoints.versions(Path(env["MODEL_DIR"]))
        print(f"shutdown: exit {proc.returncode}, newest checkpoint v{saved[0] if saved else '-'}")
    if args.profile is not None:
        print(f"profile ({args.profile}; the CPU of gunicorn's request threads):")
        print_shares(pstats.Stats(str(args.profile)), "the rest (Flask, downloads...)")
        results["profiled"] = True
    bench.finish(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
