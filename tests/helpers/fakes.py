"""Fakes: a clock that moves only when a test says, a learner whose weights show what was
merged, and an HTTP adapter that sends a real worker's requests to a Flask app in this
process. No TensorFlow here."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import requests
from requests.adapters import BaseAdapter

from fedsim.client.training import Trained
from fedsim.client.transport import RetryPolicy, Transport

from .builders import LABELS, WORKERS_TOKEN


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
