"""Real servers on 127.0.0.1: the aggregator under gunicorn, and nginx from deploy/nginx in
front of it, and slow clients to hold their connections. Each server listens on a free port
and writes its output to a log file. Readiness is a condition polled until a deadline,
never a fixed sleep."""

from __future__ import annotations

import contextlib
import os
import pwd
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import requests

from .builders import WORKERS_TOKEN, prepared

ROOT = Path(__file__).resolve().parents[2]
GUNICORN = Path(sys.executable).with_name("gunicorn")
APP = "fedsim.aggregator.app:create_app()"
CONF = "python:fedsim.aggregator.gunicorn_conf"
NGINX_ENTRYPOINT = ROOT / "deploy" / "nginx" / "entrypoint.sh"

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(
    ready: Callable[[], T], timeout: float, failure: str | Callable[[], str], poll: float = 0.05
) -> T:
    """What `ready()` returns once it is true, asked every `poll` s; after `timeout` s the
    test fails with `failure` (a callable is asked then, e.g. for a log read at the end)."""
    deadline = time.monotonic() + timeout
    while not (got := ready()):
        if time.monotonic() > deadline:
            pytest.fail(failure() if callable(failure) else failure)
        time.sleep(poll)
    return got


@dataclass
class Server:
    """A server process on 127.0.0.1:`port`; its stdout and stderr are in `log`."""

    name: str
    proc: subprocess.Popen
    port: int
    url: str
    log: Path
    model_dir: Path | None = None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def output(self) -> str:
        return self.log.read_text()

    def running(self) -> bool:
        """True while it runs; once it has exited the test fails with its output."""
        if self.proc.poll() is not None:
            pytest.fail(f"{self.name} exited {self.proc.returncode}:\n{self.output()}")
        return True


def _spawn(argv: list[str], log: Path, environ: dict[str, str], **popen) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(argv, env=environ, stdout=out, stderr=subprocess.STDOUT, **popen)


def listening(port: int) -> bool:
    """Whether 127.0.0.1:`port` accepts a connection now."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def start_gunicorn(tmp_path: Path, port: int | None = None, **env: object) -> Server:
    """The aggregator under gunicorn on MODEL_DIR=tmp_path/models, not waited for: a test
    of a refused start reads its exit code and output."""
    port = port or free_port()
    model_dir = tmp_path / "models"
    log = tmp_path / f"gunicorn-{port}.log"
    environ = {
        **os.environ,
        "MODEL_DIR": str(model_dir),
        "TOKENS_FILE": str(tmp_path / "secrets" / "tokens.json"),
        "MODEL": "mlp",
        "FEDSIM_ENV_FILE": str(tmp_path / "no.env"),  # never the developer's .env
        "BIND": f"127.0.0.1:{port}",
        **{k: str(v) for k, v in env.items()},
    }
    proc = _spawn([str(GUNICORN), "-c", CONF, APP], log, environ, cwd=tmp_path)
    return Server("gunicorn", proc, port, f"http://127.0.0.1:{port}", log, model_dir)


def healthy(server: Server) -> bool:
    """Whether /healthz answers 200 now; fails the test if the server has exited."""
    server.running()
    try:
        return requests.get(server.url + "/healthz", timeout=5).status_code == 200
    except requests.RequestException:  # not up yet, or slow to answer on a busy machine
        return False


def wait_healthy(server: Server, timeout: float = 60) -> None:
    wait_until(
        lambda: healthy(server),
        timeout,
        lambda: f"{server.name} never became healthy:\n{server.output()}",
        poll=0.1,
    )


@contextlib.contextmanager
def running_aggregator(tmp_path: Path, **env: object) -> Iterator[Server]:
    """gunicorn on a prepared MODEL_DIR (version 0, plan, tokens), healthy, stopped after."""
    prepared(tmp_path)
    server = start_gunicorn(tmp_path, **env)
    try:
        wait_healthy(server)
        yield server
    finally:
        server.stop()


def start_nginx(tmp_path: Path, upstream: str, *, tls: bool = False, **env: object) -> Server:
    """nginx from deploy/nginx/entrypoint.sh on a free port in front of `upstream` (a URL),
    from a prefix in `tmp_path`, returned once it accepts connections."""
    port = free_port()
    environ = {
        **os.environ,
        "NGINX_PREFIX": str(tmp_path / f"nginx-{port}"),
        "LISTEN_PORT": str(port),
        "UPSTREAM": upstream.removeprefix("http://"),
        "TLS": "true" if tls else "false",
        "CERT_DIR": str(tmp_path / "certs"),
        # Workers run as the master's user: as root the tests need no other account.
        "NGINX_USER": pwd.getpwuid(os.geteuid()).pw_name,
        "PATH": os.environ.get("PATH", "") + ":/usr/sbin",
        **{k: str(v) for k, v in env.items()},
    }
    log = tmp_path / f"nginx-{port}.log"
    proc = _spawn([str(NGINX_ENTRYPOINT)], log, environ)
    server = Server("nginx", proc, port, f"{'https' if tls else 'http'}://127.0.0.1:{port}", log)
    try:
        wait_until(
            lambda: server.running() and listening(port),
            30,
            lambda: f"nginx never listened on {port}:\n{server.output()}",
        )
    except BaseException:
        server.stop()
        raise
    return server


class Trickle:
    """`idle` sockets that connect and send nothing, and `slow` ones that send a request one
    byte every 0.2 s and never finish it: half stop in the head, half send a whole head for
    an upload and then its body. A thread keeps them trickling."""

    HEAD = b"GET /v1/model HTTP/1.1\r\nHost: slow\r\nX-Slow: " + b"a" * 1000
    UPLOAD = (
        b"POST /v1/updates HTTP/1.1\r\nHost: slow\r\nAuthorization: Bearer "
        + WORKERS_TOKEN.encode()
        + b"\r\nContent-Type: application/octet-stream\r\nContent-Length: 797520\r\n\r\n"
    )

    def __init__(self, port: int, idle: int, slow: int) -> None:
        def connect() -> socket.socket:
            return socket.create_connection(("127.0.0.1", port))

        self.idle = [connect() for _ in range(idle)]
        self.heads = [connect() for _ in range(slow // 2)]
        self.bodies = [connect() for _ in range(slow - slow // 2)]
        for sock in self.bodies:
            sock.sendall(self.UPLOAD)
        self.done = threading.Event()
        self.trickling = threading.Event()  # every slow socket has sent its first bytes
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sent = 0
        while not self.done.wait(0.2):
            # A socket the server closed fails here; `still_open` says so.
            for sock in self.heads:
                with contextlib.suppress(OSError):
                    sock.send(self.HEAD[sent : sent + 1])
            for sock in self.bodies:
                with contextlib.suppress(OSError):
                    sock.send(b"\0")
            sent += 1
            self.trickling.set()

    def wait_trickling(self, timeout: float = 10) -> None:
        assert self.trickling.wait(timeout), f"the slow sockets sent nothing in {timeout} s"

    def still_open(self) -> int:
        """How many sockets the server has not closed (nothing to read, no EOF)."""
        socks = self.idle + self.heads + self.bodies
        readable, _, _ = select.select(socks, [], [], 0)
        return len(socks) - len(readable)

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        for sock in self.idle + self.heads + self.bodies:
            sock.close()
