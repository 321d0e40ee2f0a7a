#!/usr/bin/env python3
"""Benchmark slow and idle connections against the proxy (nginx) and against gunicorn alone.

Holds --idle sockets that connect and send nothing and --slow sockets that send a
request one byte a second (half never finish their head, half send a whole head
for POST /v1/updates and then its body a byte at a time). A socket the server
closes is opened again at once, so the count stays up for --seconds. Meanwhile a
normal client pulls GET /v1/model every --interval seconds on a fresh connection.
For the proxy, then for gunicorn alone (1 worker x 8 threads, as in the image),
it prints how many pulls were answered and how fast, how many hostile sockets
were held and how many the server cut, and the servers' memory. Then the proxy's
cost: accepted updates per second from --uploaders processes straight to gunicorn,
through the proxy, and through the proxy with TLS, with nginx's CPU per update.

    .venv/bin/python scripts/bench_slow_clients.py [--seconds 20] [--idle 100] [--slow 100]

Needs nginx and openssl (Debian's packages); no TensorFlow, no MNIST (stand-in
labels make the partition plan). A benchmark, not a test: it gates nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests

from fedsim import checkpoints, config, weights
from fedsim.data import partition
from fedsim.models import SHAPES

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = ROOT / "deploy" / "nginx" / "entrypoint.sh"
MAKE_CERTS = ROOT / "scripts" / "make-certs.sh"
MLP_UPDATE_BYTES = 797_520  # what a real mlp upload declares
ANSWER_BOUND = 1.0  # seconds: the bound a normal pull is held to
PULL_TIMEOUT = 10.0  # seconds a pull waits before it counts as not answered


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kib(pid: int) -> int:
    """Resident memory of a process and its children (nginx's master and workers)."""
    total = 0
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0
    for p in [pid, *map(int, children)]:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children, whatever the machine's load."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0.0
    total = 0
    for p in [pid, *map(int, children)]:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


# --- hostile sockets ---------------------------------------------------------------------


HEAD = b"GET /v1/model HTTP/1.1\r\nHost: bench\r\nX-Slow: " + b"a" * 4000


def body_head(headers: dict[str, str]) -> bytes:
    """The whole head of an mlp upload, as a worker sends it (with its token)."""
    lines = [
        "POST /v1/updates HTTP/1.1",
        "Host: bench",
        "Content-Type: application/octet-stream",
        f"Content-Length: {MLP_UPDATE_BYTES}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class Conn:
    sock: socket.socket
    kind: str  # idle | head | body
    opened: float
    sent: int = 0


@dataclass
class HostileStats:
    opened: int = 0
    cut: int = 0  # closed by the server
    failed: int = 0  # could not connect
    held: list[int] = field(default_factory=list)  # sockets still open at each tick
    lifetimes: dict[str, list[float]] = field(default_factory=dict)


class Hostile:
    """`idle` silent sockets and `slow` trickling ones against 127.0.0.1:`port`, kept open
    by a thread that sends one byte per slow socket every `tick` seconds. Half the slow
    ones never finish a head; half send `upload_head` and then a body byte by byte."""

    def __init__(self, port: int, idle: int, slow: int, upload_head: bytes, tick: float = 1.0):
        self.port, self.tick, self.upload_head = port, tick, upload_head
        self.kinds = ["idle"] * idle + ["head"] * (slow // 2) + ["body"] * (slow - slow // 2)
        self.conns: list[Conn | None] = [None] * len(self.kinds)
        self.stats = HostileStats()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Hostile:
        for i in range(len(self.kinds)):
            self._open(i)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        for c in self.conns:
            if c is not None:
                c.sock.close()

    def _open(self, i: int) -> None:
        kind = self.kinds[i]
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            sock.setblocking(False)
            if kind == "body":
                sock.send(self.upload_head)
        except OSError:
            self.stats.failed += 1
            self.conns[i] = None
            return
        self.stats.opened += 1
        self.conns[i] = Conn(sock, kind, time.monotonic())

    def _closed(self, i: int) -> None:
        c = self.conns[i]
        assert c is not None
        c.sock.close()
        self.stats.cut += 1
        self.stats.lifetimes.setdefault(c.kind, []).append(time.monotonic() - c.opened)
        self.conns[i] = None

    def _run(self) -> None:
        while not self.stop.wait(self.tick):
            for i, c in enumerate(self.conns):
                if c is None:
                    continue
                readable, _, _ = select.select([c.sock], [], [], 0)
                try:
                    if readable and not c.sock.recv(65536):  # the server closed it
                        self._closed(i)
                        continue
                    if c.kind == "head":
                        c.sock.send(HEAD[c.sent % len(HEAD) : c.sent % len(HEAD) + 1])
                    elif c.kind == "body":
                        c.sock.send(b"\0")
                    c.sent += 1
                except OSError:  # reset by the server, or its buffer is full
                    self._closed(i)
            self.stats.held.append(sum(c is not None for c in self.conns))  # before reopening
            for i, c in enumerate(self.conns):
                if c is None:
                    self._open(i)


# --- pulls -------------------------------------------------------------------------------


@dataclass
class Pulls:
    times: list[float] = field(default_factory=list)  # seconds, answered pulls
    failed: list[str] = field(default_factory=list)

    def line(self) -> str:
        n = len(self.times) + len(self.failed)
        if not self.times:
            return f"0 of {n} pulls answered ({self.failed[0] if self.failed else 'none tried'})"
        ms = sorted(1000 * t for t in self.times)
        within = sum(t <= ANSWER_BOUND for t in self.times)
        return (
            f"{within} of {n} pulls answered within {ANSWER_BOUND:g} s "
            f"(p50 {statistics.median(ms):.0f} ms, p95 {ms[int(0.95 * (len(ms) - 1))]:.0f} ms, "
            f"max {ms[-1]:.0f} ms; {len(self.failed)} not answered"
            + (f": {self.failed[0]}" if self.failed else "")
            + ")"
        )


def pull_for(url: str, seconds: float, interval: float, expect: int) -> Pulls:
    """GET /v1/model on a fresh connection every `interval` s; a pull counts when whole."""
    out = Pulls()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        start = time.monotonic()
        try:
            response = requests.get(url + "/v1/model", timeout=PULL_TIMEOUT)
            if response.status_code == 200 and len(response.content) == expect:
                out.times.append(time.monotonic() - start)
            else:
                out.failed.append(f"HTTP {response.status_code}")
        except requests.RequestException as exc:
            out.failed.append(
                "timed out" if isinstance(exc, requests.Timeout) else type(exc).__name__
            )
        time.sleep(max(0.0, interval - (time.monotonic() - start)))
    return out


# --- throughput -------------------------------------------------------------------------

ID_WIDTH = 32  # update ids are patched into one pre-encoded body, so they share a width


def uploader(job: tuple[str, int, float, dict[str, str], str, int]) -> int:
    """Post valid mlp updates until the deadline; how many were accepted (not duplicates:
    each phase numbers its ids apart)."""
    url, k, deadline, headers, verify, phase = job
    rng = np.random.default_rng(k)
    tensors = {n: rng.standard_normal(s).astype(np.float32) * 0.05 for n, s in SHAPES["mlp"]}
    meta = {
        "client_id": "client-1",
        "update_id": "0" * ID_WIDTH,
        "base_version": 0,
        "num_samples": 5000,
    }
    body = bytearray(weights.encode(tensors, meta))
    at = body.index(b"0" * ID_WIDTH)
    session = requests.Session()
    accepted = i = 0
    while time.time() < deadline:
        i += 1
        body[at : at + ID_WIDTH] = f"{phase:02d}{k:04d}{i:026d}".encode()
        response = session.post(
            url + "/v1/updates",
            data=bytes(body),
            headers=headers,
            timeout=30,
            verify=verify or True,  # per request: REQUESTS_CA_BUNDLE would beat Session.verify
        )
        accepted += response.status_code == 200 and not response.json()["duplicate"]
    return accepted


def throughput(
    phase: int,
    name: str,
    url: str,
    args: argparse.Namespace,
    headers: dict[str, str],
    ca: str,
    pid: int,
) -> None:
    cpu = cpu_seconds(pid) if pid else 0.0
    with mp.get_context("fork").Pool(args.uploaders) as pool:
        deadline = time.time() + 0.5 + args.upload_seconds
        jobs = [(url, k, deadline, headers, ca, phase) for k in range(args.uploaders)]
        accepted = sum(pool.map(uploader, jobs))
    rate = accepted / args.upload_seconds
    line = (
        f"uploads {name}: {rate:.0f} accepted updates/s ({accepted} in {args.upload_seconds:g} s)"
    )
    if pid:
        line += (
            f"; nginx CPU {1000 * (cpu_seconds(pid) - cpu) / max(accepted, 1):.2f} ms per update"
        )
    print(line)


# --- servers -----------------------------------------------------------------------------


def prepare(tmp: Path) -> dict[str, str]:
    """Checkpoint 0, the partition plan and (when tokens exist) a tokens file; the env."""
    model_dir = tmp / "models"
    rng = np.random.default_rng(0)
    tensors = {n: rng.standard_normal(s).astype(np.float32) * 0.05 for n, s in SHAPES["mlp"]}
    checkpoints.save(model_dir, 0, tensors, {"samples": 0, "model": "mlp"}, keep=5)
    env = {
        "MODEL_DIR": str(model_dir),
        "MODEL": "mlp",
        "FEDSIM_ENV_FILE": str(tmp / "no.env"),
        "TOKENS_FILE": str(tmp / "secrets" / "tokens.json"),
    }
    settings = config.load(environ=env, env_file=tmp / "no.env")
    labels = (np.arange(config.TRAIN_IMAGES) % 10).astype(np.uint8)  # stand-in labels
    plan = partition.plan_settings(settings)
    partition.write(model_dir, partition.manifest(plan, partition.make(plan, labels), labels))
    try:
        from fedsim import tokens
    except ImportError:  # a version without tokens
        pass
    else:
        tokens.ensure(Path(env["TOKENS_FILE"]))
    return env


def start_gunicorn(tmp: Path, env: dict[str, str], threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    gunicorn = Path(sys.executable).with_name("gunicorn")
    proc = subprocess.Popen(
        [
            str(gunicorn),
            "-c",
            "python:fedsim.aggregator.gunicorn_conf",
            "fedsim.aggregator.app:create_app()",
        ],
        cwd=tmp,
        env={**os.environ, **env, "BIND": f"127.0.0.1:{port}", "THREADS": str(threads)},
        stdout=(tmp / "gunicorn.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    return proc, f"http://127.0.0.1:{port}"


def start_nginx(tmp: Path, upstream: str, tls: bool = False) -> tuple[subprocess.Popen, str]:
    port = free_port()
    name = "nginx-tls" if tls else "nginx"
    env = {
        **os.environ,
        "NGINX_PREFIX": str(tmp / name),
        "LISTEN_PORT": str(port),
        "UPSTREAM": upstream.removeprefix("http://"),
        "TLS": str(tls).lower(),
        "CERT_DIR": str(tmp / "certs"),
        "NGINX_USER": "root",  # used only when this runs as root: no other user is needed
    }
    proc = subprocess.Popen(
        [str(ENTRYPOINT)],
        env=env,
        stdout=(tmp / f"{name}.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    return proc, f"{'https' if tls else 'http'}://127.0.0.1:{port}"


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, ca: str = "") -> None:
    for _ in range(300):
        if proc.poll() is not None:
            raise SystemExit(f"{log.name}: exited {proc.returncode}\n{log.read_text()}")
        try:
            if requests.get(url + "/healthz", timeout=2, verify=ca or True).status_code == 200:
                return
        except requests.RequestException:  # not up yet
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} never became healthy\n{log.read_text()}")


def phase(
    name: str, url: str, pid: int, args: argparse.Namespace, expect: int, headers: dict[str, str]
) -> None:
    port = int(url.rsplit(":", 1)[1])
    quiet = pull_for(url, 2, args.interval, expect)
    print(f"{name}: no hostile sockets: {quiet.line()}")
    peak = 0
    with Hostile(port, args.idle, args.slow, body_head(headers)) as hostile:
        time.sleep(1.5)  # every socket open and trickling
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.wait(0.5):
                peak = max(peak, rss_kib(pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        loaded = pull_for(url, args.seconds, args.interval, expect)
        stop.set()
        sampler.join()
    s = hostile.stats
    held = s.held[2:] or s.held  # after the first ticks, once all are open
    cut = ", ".join(
        f"{kind} after {min(t):.0f}-{max(t):.0f} s" for kind, t in sorted(s.lifetimes.items())
    )
    print(
        f"{name}: {args.idle} idle + {args.slow} slow sockets for {args.seconds:g} s: "
        f"{loaded.line()}"
    )
    print(
        f"{name}: hostile sockets held open {min(held)}-{max(held)} of {len(hostile.kinds)}; "
        f"{s.cut} cut by the server ({cut or 'none'}), reopened; {s.failed} connects failed; "
        f"server memory peak {peak / 1024:.0f} MiB"
    )
    after = pull_for(url, 2, args.interval, expect)
    print(f"{name}: after the hostile sockets closed: {after.line()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20, help="hostile phase length")
    parser.add_argument("--idle", type=int, default=100, help="sockets that send nothing")
    parser.add_argument("--slow", type=int, default=100, help="sockets that trickle a request")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between pulls")
    parser.add_argument("--threads", type=int, default=8, help="gunicorn threads")
    parser.add_argument("--uploaders", type=int, default=8, help="uploading processes")
    parser.add_argument(
        "--upload-seconds", type=float, default=10, help="per upload phase; 0: none"
    )
    args = parser.parse_args()
    for tool in ("nginx", "openssl"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(
                f"{tool} not found: apt-get install -y {tool} (Debian's package)", file=sys.stderr
            )
            return 1

    with tempfile.TemporaryDirectory(prefix="fedsim-bench-") as name:
        tmp = Path(name)
        env = prepare(tmp)
        subprocess.run([str(MAKE_CERTS), str(tmp / "certs")], check=True, capture_output=True)
        ca = str(tmp / "certs" / "ca.pem")
        gunicorn, direct = start_gunicorn(tmp, env, args.threads)
        nginx, proxied = start_nginx(tmp, direct)
        nginx_tls, tls_url = start_nginx(tmp, direct, tls=True)
        try:
            wait_healthy(direct, gunicorn, tmp / "gunicorn.log")
            wait_healthy(proxied, nginx, tmp / "nginx.log")
            wait_healthy(tls_url, nginx_tls, tmp / "nginx-tls.log", ca)
            expect = len(requests.get(direct + "/v1/model", timeout=10).content)
            print(
                f"setup: gunicorn 1 worker x {args.threads} threads; nginx 1 worker "
                f"(deploy/nginx); {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; "
                f"pulls of {expect:,} bytes every {args.interval:g} s, fresh connection each"
            )
            headers = {}
            if Path(env["TOKENS_FILE"]).exists():
                from fedsim import tokens

                secret = tokens.workers_secret(Path(env["TOKENS_FILE"]))
                headers = {"Authorization": f"Bearer {secret}"}
            phase("proxy", proxied, nginx.pid, args, expect, headers)
            phase("gunicorn alone", direct, gunicorn.pid, args, expect, headers)
            if args.upload_seconds > 0:
                throughput(1, "straight to gunicorn", direct, args, headers, "", 0)
                throughput(2, "through the proxy", proxied, args, headers, "", nginx.pid)
                throughput(3, "through the proxy, TLS", tls_url, args, headers, ca, nginx_tls.pid)
        finally:
            for proc in (nginx_tls, nginx, gunicorn):
                proc.send_signal(signal.SIGTERM)
            for proc in (nginx_tls, nginx, gunicorn):
                proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
