"""A stand-in aggregator for the dashboard tests, and headless Chromium to look at it.

`FakeRun` holds a `/v1/status` and a `/v1/history` in the aggregator's shapes
and moves them on when a test says (a round closes, an update is refused, the
run finishes). `fake_app` serves them with the real dashboard blueprint;
`Server` runs that app on 127.0.0.1 and can stop and start again on the same
port, as an aggregator restart looks to the page. `chromium` starts Debian's
chromium through its chromedriver, never downloading a browser.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify
from werkzeug.serving import make_server

from fedsim.aggregator import dashboard

CHROMIUM = os.environ.get("FEDSIM_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("FEDSIM_CHROMEDRIVER", "/usr/bin/chromedriver")
# Chromium quiet and offline: no first-run UI, no background traffic, no updates.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1100",
)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class FakeRun:
    """A round-based run of `num_clients` logical clients, `quorum` per round."""

    def __init__(self, num_clients: int = 12, quorum: int = 4, rounds: int = 5, seed: int = 0):
        rng = random.Random(seed)
        self.lock = threading.Lock()
        self.rounds = rounds
        self.quorum = quorum
        self.version = 0
        self.finished = False
        self.events: list[dict[str, str]] = []
        self.history: list[dict[str, Any]] = []
        self.clients = []
        for k in range(1, num_clients + 1):
            labels = [rng.randrange(0, 400) for _ in range(10)]
            self.clients.append(
                {
                    "id": f"client-{k}",
                    "samples": sum(labels),
                    "labels": labels,
                    "updates": 0,
                    "last_seen": None,
                    "staleness": None,
                    "loss": None,
                    "accuracy": None,
                    "attacker": False,
                    # everyone equal, as clients.json's defaults
                    "speed": 1.0,
                    "bandwidth": None,
                    "dropout": 0.0,
                    "dropouts": 0,
                }
            )
        self.workers = [
            {"id": f"w{k}", "task": None, "client": None, "tasks_done": 0, "retries": 0,
             "last_seen": None}
            for k in (1, 2)
        ]  # fmt: skip

    # What the test does ------------------------------------------------------

    def evaluate(self, accuracy: float, loss: float) -> None:
        with self.lock:
            self.history.append(
                {
                    "version": self.version,
                    "round": self.version or None,
                    "time": now(),
                    "accuracy": accuracy,
                    "loss": loss,
                    "samples": 0,
                    "updates": self.version * self.quorum,
                    "clients": [],
                }
            )
            self._event("evaluation", f"version {self.version}: accuracy {accuracy:.4f}")

    def close_round(self) -> None:
        """The next `quorum` clients train and their round closes: a new version."""
        with self.lock:
            start = (self.version * self.quorum) % len(self.clients)
            for i in range(self.quorum):
                c = self.clients[(start + i) % len(self.clients)]
                c.update(updates=c["updates"] + 1, last_seen=now(), staleness=0, loss=0.2,
                         accuracy=0.9)  # fmt: skip
            for w in self.workers:
                w.update(tasks_done=w["tasks_done"] + 2, last_seen=now(), task=None)
            self.version += 1
            self._event(
                "round", f"round {self.version} closed: {self.quorum} updates -> v{self.version}"
            )

    def refuse(self, client_id: str, reason: str) -> None:
        with self.lock:
            self._event("refused", f"update from {client_id} refused: {reason}")

    def mark_attacker(self, client_id: str) -> None:
        with self.lock:
            next(c for c in self.clients if c["id"] == client_id)["attacker"] = True

    def profile(self, client_id: str, speed: float, bandwidth: float | None, dropout: float):
        """Give a client a population line (clients.json), as /v1/status shows it."""
        with self.lock:
            record = next(c for c in self.clients if c["id"] == client_id)
            record.update(speed=speed, bandwidth=bandwidth, dropout=dropout, dropouts=2)

    def finish(self) -> None:
        with self.lock:
            self.finished = True
            self._event("round", f"run finished at version {self.version}")

    def _event(self, kind: str, text: str) -> None:
        self.events = [*self.events, {"time": now(), "kind": kind, "text": text}][-50:]

    # What the aggregator serves ----------------------------------------------

    def status(self) -> dict[str, Any]:
        with self.lock:
            done = min(self.version, self.rounds)
            return {
                "version": self.version,
                "samples": 0,
                "model": "mlp",
                "strategy": "fedavg",
                "mode": "rounds",
                "partition": {"PARTITION": "shards", "SEED": 42, "NUM_CLIENTS": len(self.clients)},
                "finished": self.finished,
                "round": {
                    "number": min(done + 1, self.rounds),
                    "rounds_done": done,
                    "rounds": self.rounds,
                    "sampled": [],
                    "pending": 0,
                    "quorum": self.quorum,
                    "closes_in": None,
                },
                "run": {
                    "rounds": self.rounds,
                    "clients_per_round": self.quorum,
                    "logical_clients": len(self.clients),
                    "eval_every": 1,
                    "task_timeout": 300.0,
                },
                "updates": self.version * self.quorum,
                "pending_updates": 0,
                "unsaved_updates": 0,
                "clients": [dict(c) for c in self.clients],
                "workers": [dict(w) for w in self.workers],
                "events": list(self.events),
                "last_checkpoint": {"version": self.version, "time": now()}
                if self.version
                else None,
            }

    def summary(self) -> dashboard.Summary:
        with self.lock:
            last = self.history[-1] if self.history else None
            return {
                "version": self.version,
                "strategy": "fedavg",
                "model": "mlp",
                "partition": {"PARTITION": "shards", "SEED": 42, "NUM_CLIENTS": len(self.clients)},
                "last_accuracy": last["accuracy"] if last else None,
                "last_round": min(self.version, self.rounds),
                "finished": self.finished,
            }


def fake_app(run: FakeRun, chart_js: Path | str = dashboard.CHART_JS) -> Flask:
    app = Flask("fake_aggregator", static_folder=None)
    dashboard.init_app(app, summary=run.summary, chart_js=chart_js)

    @app.get("/v1/status")
    def status() -> Response:
        return jsonify(run.status())

    @app.get("/v1/history")
    def history() -> Response:
        with run.lock:
            return jsonify(history=list(run.history))

    return app


class Server:
    """`app` on 127.0.0.1 in a thread; `stop()` and `start()` keep the same port."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.port = 0
        self._server = None
        self._thread = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> None:
        self._server = make_server("127.0.0.1", self.port, self.app, threaded=True)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def chromium_missing() -> str | None:
    """Why headless Chromium cannot run here, or None when it can."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (shutil.which(path) or Path(path).is_file()):
            return f"{path} not found: apt-get install -y chromium chromium-driver ({package})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (requirements-dev.txt)"
    return None


@contextmanager
def chromium() -> Iterator[Any]:
    """A selenium Chrome driver on Debian's chromium, with a fresh profile, quit at the end."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="fedsim-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
