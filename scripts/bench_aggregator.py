#!/usr/bin/env python3
"""Benchmark the aggregator under a real gunicorn on 127.0.0.1 (mlp, async-weighted).

Measures and prints:
  - accepted updates per second with N concurrent uploaders (processes, keep-alive),
  - model downloads per second with N concurrent downloaders,
  - the aggregator worker's peak resident memory (VmHWM),
  - bytes on the wire per mlp update against its 796,840 bytes of float32 weights.

    .venv/bin/python scripts/bench_aggregator.py [--seconds 10] [--clients 8] [--threads 8]

It writes a version-0 checkpoint of the mlp layout into a temporary MODEL_DIR,
so it needs neither TensorFlow nor MNIST. A benchmark, not a test: it gates nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import requests

from fedsim import checkpoints, config, tokens, weights
from fedsim.data import partition
from fedsim.models import SHAPES, parameter_count

RAW_BYTES = parameter_count("mlp") * 4  # 796,840: the float32 weights alone
ID_WIDTH = 32  # update ids are patched into one pre-encoded body, so they share a width
TOKEN = "be" * 32  # the uploaders' token, written to the temporary TOKENS_FILE


def mlp_weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) * 0.05 for n, s in SHAPES["mlp"]}


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
    return weights.encode(mlp_weights(hash(client) % 1000), meta)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_pid(master: int) -> int:
    for _ in range(100):
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.1)
    raise RuntimeError("gunicorn started no worker")


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process: what the aggregator spent, whatever the load."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def uploader(args: tuple[str, int, float]) -> tuple[int, int]:
    """Post valid updates until the deadline; (accepted, other answers)."""
    url, k, deadline = args
    placeholder = "0" * ID_WIDTH
    body = bytearray(update_body(f"client-{k}", placeholder))
    at = body.index(placeholder.encode())
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {TOKEN}"
    accepted = other = 0
    i = 0
    while time.time() < deadline:
        i += 1
        body[at : at + ID_WIDTH] = f"{k:04d}{i:028d}".encode()
        response = session.post(url + "/v1/updates", data=bytes(body), timeout=30)
        if response.status_code == 200 and not response.json()["duplicate"]:
            accepted += 1
        else:
            other += 1
    return accepted, other


def downloader(args: tuple[str, int, float]) -> tuple[int, int]:
    url, _, deadline = args
    session = requests.Session()
    ok = other = 0
    while time.time() < deadline:
        response = session.get(url + "/v1/model", timeout=30)
        if response.status_code == 200 and len(response.content) > RAW_BYTES:
            ok += 1
        else:
            other += 1
    return ok, other


def run_phase(target, url: str, clients: int, seconds: float) -> tuple[int, int, float]:
    with mp.get_context("fork").Pool(clients) as pool:
        start = time.time() + 0.5  # let every process import and connect first
        deadline = start + seconds
        results = pool.map_async(target, [(url, k, deadline) for k in range(clients)])
        counts = results.get(timeout=seconds + 120)
    ok = sum(c[0] for c in counts)
    other = sum(c[1] for c in counts)
    return ok, other, seconds


def wire_bytes() -> None:
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10, help="length of each phase")
    parser.add_argument("--clients", type=int, default=8, help="concurrent uploaders/downloaders")
    parser.add_argument("--threads", type=int, default=8, help="gunicorn threads")
    parser.add_argument("--save-model", type=int, default=2, help="SAVE_MODEL (default 2)")
    args = parser.parse_args()

    wire_bytes()
    with tempfile.TemporaryDirectory(prefix="fedsim-bench-") as tmp:
        model_dir = Path(tmp) / "models"
        checkpoints.save(model_dir, 0, mlp_weights(0), {"samples": 0, "model": "mlp"}, keep=5)
        tokens_file = Path(tmp) / "tokens.json"
        tokens_file.write_text(
            f'{{"format": 1, "tokens": [{{"name": "bench", "token": "{TOKEN}", "clients": ["*"]}}]}}'
        )
        tokens.read(tokens_file)
        # The default plan (three slice ranges); its label histograms come from stand-in
        # labels, since no worker trains here and MNIST is not needed.
        settings = config.load(environ={"MODEL_DIR": str(model_dir)}, env_file=Path(tmp) / "none")
        plan = partition.plan_settings(settings)
        labels = (np.arange(60_000) % 10).astype(np.uint8)
        partition.write(model_dir, partition.manifest(plan, partition.make(plan, labels), labels))
        port = free_port()
        env = {
            **os.environ,
            "MODEL": "mlp",
            "AGGREGATION": "async-weighted",
            "MODEL_DIR": str(model_dir),
            "TOKENS_FILE": str(tokens_file),
            "SAVE_MODEL": str(args.save_model),
            "FEDSIM_ENV_FILE": str(Path(tmp) / "no.env"),
            "BIND": f"127.0.0.1:{port}",
            "THREADS": str(args.threads),
        }
        gunicorn = Path(sys.executable).with_name("gunicorn")
        log = Path(tmp) / "gunicorn.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    str(gunicorn),
                    "-c",
                    "python:fedsim.aggregator.gunicorn_conf",
                    "fedsim.aggregator.app:create_app()",
                ],
                cwd=tmp,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    if requests.get(url + "/healthz", timeout=1).ok:
                        break
                except requests.RequestException:  # not up yet, or slow to answer on a busy machine
                    time.sleep(0.1)
            else:
                print(log.read_text())
                return 1
            worker = worker_pid(proc.pid)
            print(
                f"setup: gunicorn 1 worker x {args.threads} threads, {os.cpu_count()} cores, "
                f"SAVE_MODEL={args.save_model}, {args.clients} client processes, "
                f"{args.seconds:g} s per phase; worker RSS at start {vm_hwm_kib(worker) / 1024:.0f} MiB"
            )
            print(f"load: {os.getloadavg()[0]:.2f} (1-min average before the run)")
            cpu = cpu_seconds(worker)
            ok, other, secs = run_phase(uploader, url, args.clients, args.seconds)
            cpu_up = cpu_seconds(worker) - cpu
            status = requests.get(url + "/v1/status", timeout=10).json()
            print(
                f"uploads: {ok / secs:.0f} accepted updates/s ({ok} in {secs:g} s, "
                f"{other} not accepted; version {status['version']}, "
                f"last checkpoint v{status['last_checkpoint']['version']}); "
                f"aggregator CPU {1000 * cpu_up / max(ok, 1):.2f} ms per update"
            )
            cpu = cpu_seconds(worker)
            ok, other, secs = run_phase(downloader, url, args.clients, args.seconds)
            cpu_down = cpu_seconds(worker) - cpu
            print(
                f"downloads: {ok / secs:.0f} model downloads/s ({ok} in {secs:g} s, {other} failed); "
                f"aggregator CPU {1000 * cpu_down / max(ok, 1):.2f} ms per download"
            )
            print(f"memory: aggregator worker peak RSS (VmHWM) {vm_hwm_kib(worker) / 1024:.0f} MiB")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        saved = checkpoints.versions(model_dir)
        print(f"shutdown: exit {proc.returncode}, newest checkpoint v{saved[0] if saved else '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
