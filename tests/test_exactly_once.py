"""Exactly once across a hard kill: the real app, the real client loop and transport.

The client's HTTP goes to the Flask app in this process; a "crash" replaces the
app with a new one on the same MODEL_DIR, without saving, as after SIGKILL.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import numpy as np
import requests
from flask import Flask
from requests.adapters import BaseAdapter

from aggregator_helpers import write_v0
from conftest import FakeClock
from fedsim import checkpoints, models
from fedsim.aggregator.app import create_app
from fedsim.client.identity import Identity
from fedsim.client.loop import Client
from fedsim.client.training import Trained
from fedsim.client.transport import RetryPolicy, Transport


class Learner:
    """Training sets every weight to the slice number: the model shows what was merged."""

    def __init__(self) -> None:
        self.weights = {n: np.zeros(s, np.float32) for n, s in models.SHAPES["mlp"]}

    def get_weights(self):
        return {k: v.copy() for k, v in self.weights.items()}

    def set_weights(self, tensors):
        self.weights = {k: v.copy() for k, v in tensors.items()}

    def train(self, slice_no: int) -> Trained:
        self.weights = {k: np.full_like(v, slice_no) for k, v in self.weights.items()}
        return Trained(slice_no, 100, 0.5, 0.9, 0.01)


class InProcess(BaseAdapter):
    """requests -> the Flask app; `crash_after_posts` swaps in a fresh app after that POST."""

    def __init__(self, make_app, crash_after_posts: int) -> None:
        super().__init__()
        self.make_app, self.app = make_app, make_app()
        self.crash_after_posts, self.posts = crash_after_posts, 0

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
        response.headers.update(answer.headers)
        response.request, response.url = request, request.url
        if request.method == "POST":
            self.posts += 1
            if self.posts == self.crash_after_posts:
                self.app = self.make_app()  # the old state is dropped unsaved
        return response

    def close(self) -> None:
        pass


def test_an_update_lost_in_a_hard_kill_is_aggregated_exactly_once(make_settings):
    # Prepare: SAVE_MODEL=2, so the 3rd update (v3) is accepted but not yet saved
    # when the aggregator dies after answering it.
    settings = make_settings(MODEL="mlp", SAVE_MODEL=2, IDLE_SAVE_SECONDS=5)
    write_v0(settings.model_dir)
    clock = FakeClock()

    def make_app() -> Flask:
        config = {"FEDSIM_SETTINGS": settings, "FEDSIM_CLOCK": clock, "FEDSIM_TICKER": False}
        return create_app({"TESTING": True, **config})

    adapter = InProcess(make_app, crash_after_posts=3)
    session = requests.Session()
    session.mount("http://", adapter)
    policy = RetryPolicy(2, 0.0, sleep=lambda s: None)
    link = Transport("http://agg:8080", policy=policy, timeout=5, session=session)

    def sleep(seconds: float) -> None:  # time passes; the aggregator's ticker runs
        clock.advance(seconds)
        adapter.app.extensions["fedsim"].tick()

    client = Client(settings, Identity(1, 1, 5, "test"), link, Learner(), clock=clock, sleep=sleep)

    # Execute
    summary = client.run_async()

    # Assert: 5 slices trained, 5 updates aggregated, each once; all in a checkpoint.
    assert summary.slices_done == 5 and summary.repushed == 1 and summary.unconfirmed == 0
    status = adapter.app.test_client().get("/v1/status").get_json()
    assert (status["version"], status["updates"], status["samples"]) == (5, 5, 500)
    assert status["unsaved_updates"] == 0
    ids = [h["update_id"] for h in status["history"]]
    assert len(ids) == len(set(ids)) == 3  # since the restart: v3 (re-pushed), v4, v5
    final = checkpoints.load_newest(settings.model_dir)
    assert final.version == 5 and final.metadata["samples"] == "500"
    # Running mean of slices 1..5, 100 samples each: (1 + 2 + 3 + 4 + 5) / 5 = 3.
    np.testing.assert_allclose(final.tensors["output/bias"], 3.0, rtol=1e-6)
