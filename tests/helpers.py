"""Fakes and builders shared by the tests: a clock, checkpoints, plans, uploads, a learner,
and an HTTP adapter that sends a real worker's requests to a Flask app in this process.
No TensorFlow here."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import requests
from flask.testing import FlaskClient
from requests.adapters import BaseAdapter

from fedsim import checkpoints, config, tokens, weights
from fedsim.client.training import Trained
from fedsim.client.transport import RetryPolicy, Transport
from fedsim.data import partition
from fedsim.models import SHAPES

# Stand-in training labels: digit i % 10 for image i. Plans made from them are real plans
# (the real partition code), without reading MNIST.
LABELS = (np.arange(config.TRAIN_IMAGES) % 10).astype(np.uint8)


# The workers' token the tests write, and one of a hand-started client "typed".
WORKERS_TOKEN = "ab" * 32
TYPED_TOKEN = "cd" * 32


def write_tokens(settings: config.Settings) -> None:
    """TOKENS_FILE with the tests' workers' token and one for a client named "typed"."""
    path = settings.tokens_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        '{"format": 1, "tokens": ['
        f'{{"name": "workers", "token": "{WORKERS_TOKEN}", "clients": ["*"]}},'
        f'{{"name": "typed", "token": "{TYPED_TOKEN}", "clients": ["typed"]}}]}}'
    )
    tokens.read(path)  # the file is valid


class AuthClient(FlaskClient):
    """Flask's test client sending the workers' token unless a test sends its own."""

    def open(self, *args: Any, **kwargs: Any):
        headers = dict(kwargs.pop("headers", None) or {})
        headers.setdefault("Authorization", f"Bearer {WORKERS_TOKEN}")
        return super().open(*args, headers=headers, **kwargs)


class FakeClock:
    """A monotonic clock that moves only when a test says, so no test really waits."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def write_plan(settings: config.Settings, labels: np.ndarray = LABELS) -> dict[str, Any]:
    """partitions.json for `settings`, as `fedsim.prepare` writes it (from `labels`)."""
    plan = partition.plan_settings(settings)
    parts = partition.make(plan, labels)
    manifest = partition.manifest(plan, parts, labels)
    settings.model_dir.mkdir(parents=True, exist_ok=True)
    partition.write(settings.model_dir, manifest)
    return manifest


def tensors(
    model: str = "mlp", fill: float = 0.0, seed: int | None = None
) -> dict[str, np.ndarray]:
    """Weights of `model`'s layout: all `fill`, or small seeded random values."""
    rng = np.random.default_rng(seed) if seed is not None else None
    return {
        name: (
            rng.standard_normal(shape).astype(np.float32) * 0.01
            if rng is not None
            else np.full(shape, fill, dtype=np.float32)
        )
        for name, shape in SHAPES[model]
    }


def write_v0(model_dir: Path, model: str = "mlp", fill: float = 0.0, **meta: object) -> Path:
    """Checkpoint version 0 as `fedsim.prepare` writes it."""
    return checkpoints.save(
        model_dir, 0, tensors(model, fill), {"samples": 0, "model": model, **meta}, keep=5
    )


def upload(
    fill: float = 1.0,
    *,
    model: str = "mlp",
    client_id: str = "client-1",
    update_id: str | None = None,
    base_version: int = 0,
    num_samples: int = 100,
    tensors_: dict[str, np.ndarray] | None = None,
    **extra: object,
) -> bytes:
    """The body of a POST /v1/updates; `extra` adds or (with None) drops metadata."""
    meta: dict[str, object] = {
        "client_id": client_id,
        "update_id": update_id or uuid.uuid4().hex,
        "base_version": base_version,
        "num_samples": num_samples,
        "slice": 1,
        "slices": "1-4",
        "loss": 0.5,
        "accuracy": 0.9,
    }
    meta.update(extra)
    meta = {k: v for k, v in meta.items() if v is not None}
    return weights.encode(tensors_ if tensors_ is not None else tensors(model, fill), meta)


class FakeLearner:
    """Training sets every weight to `mark(indices)`: the model shows what was merged.

    By default the mark is the first sample index + 1, so each task's update is
    recognisable; `trained` lists the (first index, seed) of every task trained.
    """

    def __init__(self, model: str = "mlp", labels: np.ndarray = LABELS) -> None:
        self.model, self.labels = model, labels
        self.trained: list[tuple[int, int]] = []
        self.evaluated: list[float] = []

    def train(
        self,
        tensors: Mapping[str, np.ndarray],
        indices,
        settings: Mapping[str, Any],
        seed: int,
        *,
        labels: np.ndarray | None = None,
    ) -> tuple[dict[str, np.ndarray], Trained]:
        indices = np.asarray(indices)
        self.trained.append((int(indices[0]), seed))
        self.labels_seen, self.last_indices = labels, indices
        mark = float(indices[0] + 1)
        out = {name: np.full(t.shape, mark, np.float32) for name, t in tensors.items()}
        return out, Trained(len(indices), 0.5, 0.9, 0.01)

    def evaluate(self, tensors: Mapping[str, np.ndarray]) -> tuple[float, float, float]:
        mean = float(np.mean(next(iter(tensors.values()))))
        self.evaluated.append(mean)
        return 0.5, 1.0, 0.01


class InProcess(BaseAdapter):
    """requests -> a Flask app in this process. `crash()` swaps in a fresh app on the same
    MODEL_DIR, the old state dropped unsaved, as after SIGKILL; `after_post` may call it."""

    def __init__(self, make_app: Callable[[], Any]) -> None:
        super().__init__()
        self.make_app, self.app = make_app, make_app()
        self.posts = 0
        self.after_post: Callable[[InProcess, str], None] | None = None

    def crash(self) -> None:
        self.app = self.make_app()

    def send(self, request, **kwargs):
        url = urlsplit(request.url)
        answer = self.app.test_client().open(
            url.path,
            method=request.method,
            query_string=url.query,
            data=request.body,
            headers=dict(request.headers),
        )
        response = requests.Response()
        response.status_code, response._content = answer.status_code, answer.data
        response._content_consumed = True  # the whole body is here, as after a real read
        response.headers.update(answer.headers)
        response.request, response.url = request, request.url
        if request.method == "POST":
            self.posts += 1
            if self.after_post is not None:
                self.after_post(self, url.path)
        return response

    def close(self) -> None:
        pass


def in_process_transport(adapter: InProcess, attempts: int = 2) -> Transport:
    session = requests.Session()
    session.mount("http://fedsim/", adapter)
    policy = RetryPolicy(attempts, 0.0, sleep=lambda s: None)
    return Transport(
        "http://fedsim", policy=policy, timeout=5, session=session, token=WORKERS_TOKEN
    )
