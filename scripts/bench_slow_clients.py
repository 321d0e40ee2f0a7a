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

Needs nginx and openssl (Debian's packages); no TensorFlow, no MNIST (scripts/benchlib's
stand-in aggregator). Refuses to start above a load of 1.0 unless --force. A benchmark,
not a test: it gates nothing.
"""

from __future__ import annotations

import argparse
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

import requests

from benchlib import ROOT, Bench, PeakMemory, add_arguments, cpu_seconds, serve
from fedsim import weights

MAKE_CERTS = ROOT / "scripts" / "make-certs.sh"
MLP_UPDATE_BYTES = 797_520  # what a real mlp upload declares
ANSWER_BOUND = 1.0  # seconds: the bound a normal pull is held to
PULL_TIMEOUT = 10.0  # seconds a pull waits before it counts as not answered


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

    def summary(self) -> dict:
        ms = sorted(1000 * t for t in self.times)
        return {
            "answered": len(self.times),
            "within_bound": sum(t <= ANSWER_BOUND for t in self.times),
            "not_answered": len(self.failed),
            "p50_ms": statistics.median(ms) if ms else None,
            "max_ms": ms[-1] if ms else None,
        }

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


def throughput(
    bench: Bench,
    phase: int,
    name: str,
    url: str,
    args: argparse.Namespace,
    headers: dict[str, str],
    ca: str,
    pid: int,
) -> dict:
    """Accepted mlp updates per second from --uploaders processes (each phase numbers
    its ids apart, so none is a duplicate); with `pid`, that server's CPU per update."""
    meta = {"client_id": "client-1", "update_id": "0" * serve.ID_WIDTH, "base_version": 0}
    body = weights.encode(serve.mlp_weights(phase), {**meta, "num_samples": 5000})
    load, cpu = bench.load(), cpu_seconds(pid) if pid else 0.0
    accepted, _ = serve.for_seconds(
        serve.uploads, args.uploaders, args.upload_seconds, url, body, f"{phase:02d}", headers, ca
    )
    rate = accepted / args.upload_seconds
    line = (
        f"uploads {name}: {rate:.0f} accepted updates/s ({accepted} in {args.upload_seconds:g} s)"
    )
    figure = {"phase": f"uploads {name}", "per_second": rate, "accepted": accepted}
    if pid:
        figure["nginx_cpu_ms"] = 1000 * (cpu_seconds(pid) - cpu) / max(accepted, 1)
        line += f"; nginx CPU {figure['nginx_cpu_ms']:.2f} ms per update"
    bench.say(line, load)
    return bench.figure(figure, load)


# --- servers -----------------------------------------------------------------------------


def phase(
    bench: Bench,
    name: str,
    url: str,
    pid: int,
    args: argparse.Namespace,
    expect: int,
    headers: dict[str, str],
) -> dict:
    port = int(url.rsplit(":", 1)[1])
    load = bench.load()
    quiet = pull_for(url, 2, args.interval, expect)
    bench.say(f"{name}: no hostile sockets: {quiet.line()}", load)
    with Hostile(port, args.idle, args.slow, body_head(headers)) as hostile:
        time.sleep(1.5)  # every socket open and trickling
        with PeakMemory(pid) as memory:
            loaded = pull_for(url, args.seconds, args.interval, expect)
    s = hostile.stats
    held = s.held[2:] or s.held  # after the first ticks, once all are open
    cut = ", ".join(
        f"{kind} after {min(t):.0f}-{max(t):.0f} s" for kind, t in sorted(s.lifetimes.items())
    )
    bench.say(
        f"{name}: {args.idle} idle + {args.slow} slow sockets for {args.seconds:g} s: "
        f"{loaded.line()}",
        load,
    )
    bench.say(
        f"{name}: hostile sockets held open {min(held)}-{max(held)} of {len(hostile.kinds)}; "
        f"{s.cut} cut by the server ({cut or 'none'}), reopened; {s.failed} connects failed; "
        f"server memory peak {memory.peak / 2**20:.0f} MiB",
        load,
    )
    after = pull_for(url, 2, args.interval, expect)
    bench.say(f"{name}: after the hostile sockets closed: {after.line()}", load)
    return bench.figure(
        {
            "phase": name,
            "quiet": quiet.summary(),
            "hostile": loaded.summary(),
            "after": after.summary(),
            "held": [min(held), max(held)],
            "cut": s.cut,
            "connects_failed": s.failed,
            "server_peak_bytes": memory.peak,
        },
        load,
    )


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
    add_arguments(parser)
    args = parser.parse_args()
    missing = serve.nginx_missing()
    if missing is None and shutil.which("openssl") is None:
        missing = "openssl not found: apt-get install -y openssl (Debian's package)"
    if missing is not None:
        print(missing, file=sys.stderr)
        return 1
    bench = Bench.from_args("bench_slow_clients", args)
    bench.header()

    results = []
    with tempfile.TemporaryDirectory(prefix="fedsim-bench-") as name:
        tmp = Path(name)
        env = serve.stand_in(tmp)
        subprocess.run([str(MAKE_CERTS), str(tmp / "certs")], check=True, capture_output=True)
        ca = str(tmp / "certs" / "ca.pem")
        gunicorn, direct, log = serve.start_gunicorn(tmp, env, args.threads)
        nginx, proxied = serve.start_nginx(tmp, direct)
        nginx_tls, tls_url = serve.start_nginx(tmp, direct, tls=True)
        try:
            serve.wait_healthy(direct, gunicorn, log)
            serve.wait_healthy(proxied, nginx, tmp / "nginx.log")
            serve.wait_healthy(tls_url, nginx_tls, tmp / "nginx-tls.log", ca)
            expect = len(requests.get(direct + "/v1/model", timeout=10).content)
            print(
                f"setup: gunicorn 1 worker x {args.threads} threads; nginx 1 worker "
                f"(deploy/nginx); pulls of {expect:,} bytes every {args.interval:g} s, "
                "fresh connection each"
            )
            headers = serve.workers_header(env)
            results.append(phase(bench, "proxy", proxied, nginx.pid, args, expect, headers))
            results.append(
                phase(bench, "gunicorn alone", direct, gunicorn.pid, args, expect, headers)
            )
            if args.upload_seconds > 0:
                for k, (label, url, ca_file, pid) in enumerate(
                    [
                        ("straight to gunicorn", direct, "", 0),
                        ("through the proxy", proxied, "", nginx.pid),
                        ("through the proxy, TLS", tls_url, ca, nginx_tls.pid),
                    ],
                    start=1,
                ):
                    results.append(throughput(bench, k, label, url, args, headers, ca_file, pid))
        finally:
            for proc in (nginx_tls, nginx, gunicorn):
                proc.send_signal(signal.SIGTERM)
            for proc in (nginx_tls, nginx, gunicorn):
                proc.wait(timeout=60)
    bench.finish(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
