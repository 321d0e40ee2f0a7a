"""The aggregator app in this process on a fake clock, and the calls tests make to it
through Flask's test client: post an update, ask for a task, answer it, look an update up."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from fedsim import checkpoints, config, weights
from fedsim.aggregator.app import create_app
from fedsim.aggregator.state import State

from .builders import WORKERS_TOKEN, upload, write_plan, write_population, write_tokens, write_v0
from .fakes import FakeClock

# A round-based run small enough to follow by hand: 2 of 10 iid clients per round.
ROUNDS = {"AGGREGATION": "fedavg", "PARTITION": "iid", "NUM_CLIENTS": 10, "CLIENTS_PER_ROUND": 2}


class AuthClient(FlaskClient):
    """Flask's test client sending the workers' token unless a test sends its own."""

    def open(self, *args: Any, **kwargs: Any):
        headers = dict(kwargs.pop("headers", None) or {})
        headers.setdefault("Authorization", f"Bearer {WORKERS_TOKEN}")
        return super().open(*args, headers=headers, **kwargs)


def build_app(
    make_settings: Callable[..., config.Settings],
    clock: FakeClock,
    *,
    write: bool = True,
    ticker: bool = False,
    **overrides: object,
) -> Flask:
    """An app on MODEL_DIR holding version 0 (all zeros) and its plan, unless write=False.

    The tokens file is written when missing; `ticker` runs the real background ticker on
    the real clock instead of `clock`.
    """
    settings = make_settings(**{"MODEL": "mlp", **overrides})
    if write and not checkpoints.versions(settings.model_dir):
        write_v0(settings.model_dir)
    if write and not (settings.model_dir / "partitions.json").exists():
        write_plan(settings)
    if write and not (settings.model_dir / "clients.json").exists():
        write_population(settings)
    if not settings.tokens_file.exists():
        write_tokens(settings)
    app = create_app(
        {
            "TESTING": True,
            "FEDSIM_SETTINGS": settings,
            "FEDSIM_CLOCK": None if ticker else clock,
            "FEDSIM_TICKER": ticker,
            # One thread drives these apps: an ask held for another request would only wait.
            "FEDSIM_HOLD": 0.0,
        }
    )
    app.test_client_class = AuthClient
    return app


def planned(
    make_settings: Callable[..., config.Settings], model_dir: Path, base: dict, **rule: object
) -> dict:
    """The settings `base` and `rule` make on `model_dir`, with their plan and population
    written there: what the apps of a run are then built from."""
    rule = {**base, **rule, "MODEL_DIR": str(model_dir)}
    settings = make_settings(**rule)
    write_plan(settings)
    write_population(settings)
    return rule


def state_of(app: Flask) -> State:
    return app.extensions["fedsim"]


def model_dir(app: Flask) -> Path:
    return state_of(app).settings.model_dir


def served(client: FlaskClient) -> tuple[bytes, int, int]:
    """The model bytes as served, and version and samples from /v1/status."""
    body = client.get("/v1/model").data
    status = client.get("/v1/status").get_json()
    return body, status["version"], status["samples"]


def post(client: FlaskClient, body: bytes, **kwargs):
    return client.post("/v1/updates", data=body, content_type="application/octet-stream", **kwargs)


def lookup(client: FlaskClient, update_id: str, seq: int | None = None):
    query = f"?seq={seq}" if seq is not None else ""
    return client.get(f"/v1/updates/{update_id}{query}")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def ask(client: FlaskClient, worker: str = "wk-1") -> dict:
    response = client.post("/v1/tasks", json={"worker": worker})
    assert response.status_code == 200
    return response.get_json()


def answer(task: dict, fill: float, num_samples: int | None = None, **extra: object) -> bytes:
    """The upload a worker makes for `task`."""
    return upload(
        fill,
        client_id=task["client"],
        update_id=task["id"],
        task=task["id"],
        lease=task["lease"],
        base_version=task["base_version"],
        num_samples=num_samples or task["samples"],
        slice=None,
        slices=None,
        **extra,
    )


def drive(
    make_app: Callable[..., Flask],
    rule: dict,
    order_seed: int,
    workers: int,
    fill: Callable[[FlaskClient, dict], float],
    fields: tuple[str, ...] = ("version", "round", "clients", "sim_seconds"),
    stop_after: int | None = None,
):
    """A run of `workers` fake workers on an app of `rule`: they ask, get a task each and
    push their results in a real order shuffled by `order_seed`; evaluations are answered
    at once. A task's update is `fill(client, task)`, taken when the task is handed out.

    Returns the history (the entries' `fields`), the final model (version, samples,
    bytes) and the pushes in real order (task id, status); or, stopped after `stop_after`
    pushes, the app, the tasks still held and the pushes."""
    app = make_app(**rule)
    client = app.test_client()
    rng = random.Random(order_seed)
    held: dict[str, dict] = {}
    pushed: list[tuple[str, int]] = []
    for _ in range(1000):
        finished = False
        for w in (f"wk-{i}" for i in range(workers)):
            if w in held:
                continue
            offer = ask(client, w)
            task, finished = offer["task"], offer["finished"]
            if task is not None and task["kind"] == "evaluate":
                body = {"worker": w, "task": task["id"], "lease": task["lease"]}
                client.post("/v1/evaluations", json={**body, "accuracy": 0.5, "loss": 1.0})
            elif task is not None:
                held[w] = {**task, "fill": fill(client, task)}
        if not held:
            if finished:
                break
            continue
        task = held.pop(rng.choice(sorted(held)))
        pushed.append((task["id"], post(client, answer(task, task["fill"])).status_code))
        if stop_after is not None and len(pushed) >= stop_after:
            return app, held, pushed
    history = [tuple(e[f] for f in fields) for e in client.get("/v1/history").get_json()["history"]]
    tensors, meta = weights.decode(client.get("/v1/model").data)
    model = (meta["version"], meta["samples"], {k: v.tobytes() for k, v in tensors.items()})
    return history, model, pushed
