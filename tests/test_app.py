"""The aggregator's HTTP API through Flask's test client, with a fake clock and no TensorFlow."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from safetensors.numpy import save as st_save

from fedsim import checkpoints, weights
from fedsim.aggregator.app import create_app
from fedsim.aggregator.state import State
from helpers import (
    TYPED_TOKEN,
    AuthClient,
    FakeClock,
    tensors,
    upload,
    write_plan,
    write_tokens,
    write_v0,
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_app(make_settings, clock) -> Callable[..., Flask]:
    """An app on a fresh MODEL_DIR holding version 0 (all zeros), unless write=False."""

    def make(*, write: bool = True, ticker: bool = False, **overrides: object) -> Flask:
        settings = make_settings(**{"MODEL": "mlp", **overrides})
        if write and not checkpoints.versions(settings.model_dir):
            write_v0(settings.model_dir)
        if write and not (settings.model_dir / "partitions.json").exists():
            write_plan(settings)
        if not settings.tokens_file.exists():
            write_tokens(settings)
        app = create_app(
            {
                "TESTING": True,
                "FEDSIM_SETTINGS": settings,
                "FEDSIM_CLOCK": None if ticker else clock,
                "FEDSIM_TICKER": ticker,
            }
        )
        app.test_client_class = AuthClient
        return app

    return make


@pytest.fixture
def app(make_app) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def state_of(app: Flask) -> State:
    return app.extensions["fedsim"]


def served(client: FlaskClient) -> tuple[bytes, int, int]:
    """The model bytes as served, and version and samples from /v1/status."""
    body = client.get("/v1/model").data
    status = client.get("/v1/status").get_json()
    return body, status["version"], status["samples"]


def post(client: FlaskClient, body: bytes, **kwargs):
    return client.post("/v1/updates", data=body, content_type="application/octet-stream", **kwargs)


def model_dir(app: Flask) -> Path:
    return state_of(app).settings.model_dir


# --- routes -------------------------------------------------------------------------


def test_healthz(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "version": 0}


def test_model_is_safetensors_with_version_samples_model_and_etag(client: FlaskClient) -> None:
    response = client.get("/v1/model")
    assert response.status_code == 200
    assert response.content_type == "application/octet-stream"
    assert response.headers["ETag"].startswith('"0-')  # the version and a digest of the bytes
    assert response.headers["X-Fedsim-Version"] == "0"
    got, meta = weights.decode(response.data)
    assert meta == {"version": "0", "samples": "0", "model": "mlp"}
    np.testing.assert_array_equal(got["hidden1/kernel"], tensors("mlp")["hidden1/kernel"])


def test_if_none_match_gives_304_until_the_model_changes(client: FlaskClient) -> None:
    etag = client.get("/v1/model").headers["ETag"]
    not_modified = client.get("/v1/model", headers={"If-None-Match": etag})
    assert not_modified.status_code == 304
    assert not_modified.data == b""
    assert post(client, upload(1.0)).status_code == 200
    changed = client.get("/v1/model", headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.headers["ETag"].startswith('"1-')


def test_etag_differs_when_a_restart_remakes_a_version_from_other_weights(make_app) -> None:
    # Prepare: version 1 made from one update, then lost in a crash (never saved).
    app = make_app()
    client = app.test_client()
    assert post(client, upload(1.0)).status_code == 200
    first = client.get("/v1/model").headers["ETag"]
    # Execute: a restart re-makes version 1 from another update.
    client = make_app().test_client()
    assert post(client, upload(2.0)).status_code == 200
    # Assert: a worker holding the first version 1 downloads the new one.
    again = client.get("/v1/model", headers={"If-None-Match": first})
    assert again.status_code == 200
    assert again.headers["X-Fedsim-Version"] == "1"


def test_model_is_encoded_once_per_version_not_per_request(client, monkeypatch) -> None:
    body = upload(1.0)
    calls = []
    real = weights.encode
    monkeypatch.setattr(weights, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = client.get("/v1/model").data
    assert client.get("/v1/model").data == first
    assert calls == []
    post(client, body)
    for _ in range(3):
        client.get("/v1/model")
    assert len(calls) == 1


def test_async_weighted_update_math_through_the_api(client: FlaskClient) -> None:
    # Prepare: version 0 is all zeros with 0 samples.
    # Execute: 100 samples of 2.0, then 300 samples of 5.0.
    first = post(client, upload(2.0, num_samples=100))
    second = post(client, upload(5.0, num_samples=300, client_id="client-2", base_version=0))
    # Assert: v1 = 2.0 (a = 0), v2 = (100*2 + 300*5) / 400 = 4.25.
    assert first.get_json() == {"accepted": True, "version": 1, "duplicate": False, "seq": 1}
    assert second.get_json() == {"accepted": True, "version": 2, "duplicate": False, "seq": 2}
    got, meta = weights.decode(client.get("/v1/model").data)
    assert meta["version"] == "2" and meta["samples"] == "400"
    for tensor in got.values():
        np.testing.assert_allclose(tensor, 4.25, rtol=1e-6)


def test_fedasync_update_math_through_the_api_and_resume(make_app, make_settings) -> None:
    # Prepare: version 0 is all zeros; alpha = 0.5, a = 0.5, a checkpoint per update.
    settings = {"AGGREGATION": "fedasync", "FEDASYNC_ALPHA": 0.5, "FEDASYNC_STALENESS": 0.5}
    client = make_app(SAVE_MODEL=1, **settings).test_client()
    # Execute: a fresh update of 2.0, then an update of 4.0 still based on version 0.
    first = post(client, upload(2.0, num_samples=100))
    second = post(client, upload(4.0, num_samples=300, client_id="client-2", base_version=0))
    # Assert: v1 = 0.5 * 2 = 1 (t - tau = 0); v2: t - tau = 1, alpha_t = 0.5 / sqrt(2).
    assert first.get_json() == {"accepted": True, "version": 1, "duplicate": False, "seq": 1}
    assert second.get_json() == {"accepted": True, "version": 2, "duplicate": False, "seq": 2}
    expected = 1.0 + 0.5 / np.sqrt(2.0) * (4.0 - 1.0)
    got, meta = weights.decode(client.get("/v1/model").data)
    assert meta["version"] == "2" and meta["samples"] == "400"
    for tensor in got.values():
        np.testing.assert_allclose(tensor, expected, rtol=1e-6)
    status = client.get("/v1/status").get_json()
    assert status["strategy"] == "fedasync" and status["round"] is None
    # A restarted aggregator resumes at version 2, so staleness keeps counting from there.
    again = make_app(SAVE_MODEL=1, **settings).test_client()
    third = post(again, upload(0.0, num_samples=100, base_version=2))
    assert third.get_json()["version"] == 3
    got, _ = weights.decode(again.get("/v1/model").data)
    for tensor in got.values():
        np.testing.assert_allclose(tensor, expected / 2, rtol=1e-6)


def test_duplicate_update_id_is_acknowledged_and_aggregated_once(client: FlaskClient) -> None:
    body = upload(2.0, update_id="retry-me", num_samples=100)
    assert post(client, body).get_json() == {
        "accepted": True,
        "version": 1,
        "duplicate": False,
        "seq": 1,
    }
    again = post(client, body)
    assert again.status_code == 200
    assert again.get_json() == {"accepted": True, "version": 1, "duplicate": True, "seq": 1}
    _, version, samples = served(client)
    assert (version, samples) == (1, 100)
    assert client.get("/v1/status").get_json()["clients"][0]["updates"] == 1


def test_unknown_route_and_method_are_json(client: FlaskClient) -> None:
    missing = client.get("/nope")
    assert missing.status_code == 404
    assert missing.get_json()["error"] == "not_found"
    wrong = client.get("/v1/updates")
    assert wrong.status_code == 405
    assert set(wrong.get_json()) == {"error", "detail"}


# --- errors never change the model, version, samples or dedup set ----------------------


def assert_error_changed_nothing(client: FlaskClient, before, update_id: str) -> None:
    assert served(client) == before
    # The refused update_id is not remembered: the same id, valid, is aggregated as new.
    version = before[1]
    ok = post(client, upload(3.0, update_id=update_id, base_version=version))
    assert ok.get_json() == {
        "accepted": True,
        "version": version + 1,
        "duplicate": False,
        "seq": version + 1,
    }


@pytest.fixture
def after_one_update(client: FlaskClient):
    """The client after one accepted update (version 1, 100 samples), and what it serves."""
    post(client, upload(2.0, num_samples=100))
    return served(client)


def st_bytes(arrays: dict[str, np.ndarray], **meta: object) -> bytes:
    """safetensors bytes exactly as given (weights.encode would cast to float32)."""
    base = {"client_id": "c", "update_id": "bad", "base_version": "1", "num_samples": "10"}
    return st_save(arrays, metadata={k: str(v) for k, v in {**base, **meta}.items()})


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"not safetensors at all", "unreadable"),
        (b"\xff" * 8 + b"{}", "unreadable"),
        (upload(update_id="bad", client_id=None), "bad_metadata"),
        (upload(update_id="bad", base_version="one"), "bad_metadata"),
        (upload(update_id="bad", client_id="line\nbreak"), "bad_metadata"),
        (upload(update_id="bad", loss="low"), "bad_metadata"),
        (upload(update_id="bad", slice="3\n"), "bad_metadata"),
    ],
    ids=[
        "garbage",
        "huge-header",
        "no-client-id",
        "text-base-version",
        "bad-client-id",
        "bad-loss",
        "slice-newline",
    ],
)
def test_400_changes_nothing(client, after_one_update, body: bytes, code: str) -> None:
    response = post(client, body)
    assert response.status_code == 400
    assert response.get_json()["error"] == code
    assert response.get_json()["detail"]
    assert_error_changed_nothing(client, after_one_update, "bad")


def test_400_without_update_id(client, after_one_update) -> None:
    response = post(client, _no_update_id())
    assert response.status_code == 400
    assert "update_id" in response.get_json()["detail"]
    assert served(client) == after_one_update


def _no_update_id() -> bytes:
    meta = {"client_id": "c", "base_version": "1", "num_samples": "10"}
    return weights.encode(tensors("mlp", 1.0), meta)


@pytest.mark.parametrize(
    ("body", "code", "detail"),
    [
        (upload(update_id="bad", base_version=1, num_samples=0), "bad_num_samples", "num_samples"),
        (upload(update_id="bad", base_version=1, num_samples=-5), "bad_num_samples", "num_samples"),
        (upload(update_id="bad", base_version=1, num_samples="3.5"), "bad_num_samples", ">= 1"),
        (upload(update_id="bad", base_version=1, num_samples=None), "bad_num_samples", "None"),
        (
            upload(update_id="bad", base_version=1, tensors_=tensors("cnn")),
            "invalid_weights",
            "names",
        ),
        (
            upload(
                update_id="bad",
                base_version=1,
                tensors_={**tensors("mlp"), "output/bias": np.zeros(11, np.float32)},
            ),
            "invalid_weights",
            "shape",
        ),
        (
            st_bytes({k: v.astype(np.float64) for k, v in tensors("mlp").items()}),
            "invalid_weights",
            "F64, expected F32",
        ),
        (
            upload(
                update_id="bad",
                base_version=1,
                tensors_={**tensors("mlp"), "output/bias": np.full(10, np.nan, np.float32)},
            ),
            "invalid_weights",
            "NaN",
        ),
    ],
    ids=["zero", "negative", "fraction", "missing", "names", "shape", "dtype", "nan"],
)
def test_422_changes_nothing(client, after_one_update, body: bytes, code: str, detail: str) -> None:
    response = post(client, body)
    assert response.status_code == 422
    assert response.get_json()["error"] == code
    assert detail in response.get_json()["detail"]
    assert_error_changed_nothing(client, after_one_update, "bad")


def test_413_by_content_length_changes_nothing(make_app) -> None:
    client = make_app(MAX_UPDATE_BYTES=100_000).test_client()
    before = served(client)
    response = post(client, upload(1.0, update_id="big"))  # ~797 kB
    assert response.status_code == 413
    assert response.get_json()["error"] == "too_large"
    assert "MAX_UPDATE_BYTES=100000" in response.get_json()["detail"]
    assert served(client) == before
    assert state_of(client.application).status()["updates"] == 0


def test_413_without_content_length_caps_the_read(make_app) -> None:
    client = make_app(MAX_UPDATE_BYTES=100_000).test_client()
    before = served(client)
    response = client.post(
        "/v1/updates",
        input_stream=io.BytesIO(upload(1.0, update_id="chunked")),
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert response.status_code == 413
    assert response.get_json()["error"] == "too_large"
    assert served(client) == before


# --- fedavg through the API -----------------------------------------------------------


# --- checkpoints and resume -----------------------------------------------------------


def test_checkpoint_every_save_model_updates(make_app) -> None:
    app = make_app(SAVE_MODEL=3)
    client = app.test_client()
    ids = ["u1", "u2", "u3"]
    for i, update_id in enumerate(ids[:2]):
        post(client, upload(1.0 + i, update_id=update_id))
    assert checkpoints.versions(model_dir(app)) == [0]
    assert client.get("/v1/status").get_json()["unsaved_updates"] == 2
    post(client, upload(3.0, update_id="u3"))
    assert checkpoints.versions(model_dir(app)) == [3, 0]
    ckpt = checkpoints.read(checkpoints.path_for(model_dir(app), 3))
    assert ckpt.metadata["samples"] == "300"
    assert ckpt.metadata["strategy"] == "async-weighted"
    assert json.loads(ckpt.metadata["applied_ids"]) == ids
    assert (model_dir(app) / "latest").read_text().strip() == "ckpt-3.safetensors"
    status = client.get("/v1/status").get_json()
    assert status["unsaved_updates"] == 0
    assert status["last_checkpoint"]["version"] == 3


def test_resume_from_newest_checkpoint_keeps_dedup(make_app) -> None:
    first = make_app(SAVE_MODEL=2)
    post(first.test_client(), upload(2.0, update_id="u1", num_samples=100))
    post(first.test_client(), upload(4.0, update_id="u2", num_samples=100))  # checkpoint v2
    # A restart: a new app on the same folder.
    client = make_app(SAVE_MODEL=2).test_client()
    body, version, samples = served(client)
    assert (version, samples) == (2, 200)
    np.testing.assert_allclose(weights.decode(body)[0]["output/bias"], 3.0, rtol=1e-6)
    retry = post(client, upload(2.0, update_id="u1", num_samples=100))
    assert retry.get_json() == {"accepted": True, "version": 2, "duplicate": True, "seq": 1}


def test_corrupt_newest_checkpoint_is_skipped(make_app, make_settings, caplog) -> None:
    settings = make_settings()
    write_v0(settings.model_dir)
    checkpoints.save(
        settings.model_dir, 1, tensors("mlp", 1.0), {"samples": 7, "model": "mlp"}, keep=5
    )
    good = checkpoints.path_for(settings.model_dir, 1).read_bytes()
    checkpoints.path_for(settings.model_dir, 2).write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.INFO):
        client = make_app().test_client()
    assert served(client)[1:] == (1, 7)
    assert "skipping checkpoint" in caplog.text and "ckpt-2" in caplog.text
    assert "resumed from" in caplog.text and "ckpt-1" in caplog.text


def test_refuses_to_start_without_a_checkpoint(make_app, caplog) -> None:
    with pytest.raises(SystemExit) as info:
        make_app(write=False)
    assert info.value.code == 3  # gunicorn stops instead of respawning the worker
    message = str(info.value.__cause__)
    assert "no checkpoint in" in message
    assert "python -m fedsim.prepare" in message and "docker compose up" in message
    assert message in caplog.text


def test_refuses_a_checkpoint_of_another_model(make_app, make_settings, caplog) -> None:
    write_v0(make_settings().model_dir, model="cnn")
    with pytest.raises(SystemExit):
        make_app()
    assert "holds model 'cnn' but MODEL=mlp" in caplog.text


def test_a_checkpoint_with_the_wrong_layout_is_skipped(make_app, make_settings, caplog) -> None:
    # No model named in the metadata: the layout itself is checked, and a checkpoint
    # that does not fit is skipped like a corrupt one.
    model_dir = make_settings().model_dir
    write_v0(model_dir)
    checkpoints.save(model_dir, 1, tensors("cnn"), {"samples": 0}, keep=5)
    client = make_app().test_client()
    assert client.get("/healthz").get_json()["version"] == 0
    assert "skipping checkpoint" in caplog.text and "ckpt-1" in caplog.text
    assert "wrong tensor names" in caplog.text


def test_saved_update_ids_are_bounded_so_the_checkpoint_reads_back(make_app) -> None:
    app = make_app(SAVE_MODEL=1000)
    client = app.test_client()
    long_id = "\u00e9" * 120  # 6 bytes each once JSON-escaped: ~43 ids fit in 32 kB
    for i in range(60):
        post(client, upload(1.0, update_id=f"{long_id}{i:03d}"))
    state_of(app).close()
    ckpt = checkpoints.load_newest(model_dir(app))
    assert ckpt is not None and ckpt.version == 60
    saved = json.loads(ckpt.metadata["applied_ids"])
    assert 0 < len(saved) < 60
    assert saved[-1] == f"{long_id}059"


def test_idle_save_with_a_fake_clock(make_app, clock) -> None:
    app = make_app(SAVE_MODEL=10, IDLE_SAVE_SECONDS=5)
    post(app.test_client(), upload(1.0))
    state_of(app).tick()
    assert checkpoints.versions(model_dir(app)) == [0]
    clock.advance(5)
    state_of(app).tick()
    assert checkpoints.versions(model_dir(app)) == [1, 0]


def test_idle_save_by_the_background_ticker(make_app) -> None:
    app = make_app(SAVE_MODEL=10, IDLE_SAVE_SECONDS=0.1, ticker=True)
    try:
        post(app.test_client(), upload(1.0))
        done = threading.Event()
        for _ in range(200):  # up to ~10 s on a loaded machine; usually ~0.2 s
            if checkpoints.versions(model_dir(app))[0] == 1:
                done.set()
                break
            threading.Event().wait(0.05)
        assert done.is_set()
    finally:
        state_of(app).close()


def test_close_checkpoints_unsaved_updates(make_app) -> None:
    app = make_app(SAVE_MODEL=10)
    post(app.test_client(), upload(1.0, update_id="last"))
    state_of(app).close()
    ckpt = checkpoints.load_newest(model_dir(app))
    assert ckpt is not None and ckpt.version == 1
    assert json.loads(ckpt.metadata["applied_ids"]) == ["last"]


# --- status and concurrency -----------------------------------------------------------


def test_status_contents(make_app) -> None:
    app = make_app(SAVE_MODEL=2)
    client = app.test_client()
    post(client, upload(1.0, client_id="a", slice=1, slices="1-4", loss=0.25, accuracy=0.75))
    post(client, upload(1.0, client_id="b", slice=5, slices="5-8", num_samples=50))
    post(client, upload(1.0, client_id="a", slice=2, slices="1-4", loss=0.125, retries=1))
    status = client.get("/v1/status").get_json()
    assert status["version"] == 3 and status["samples"] == 250
    assert status["model"] == "mlp" and status["strategy"] == "async-weighted"
    assert status["round"] is None and status["finished"] is False
    clients = {c["id"]: c for c in status["clients"]}
    assert clients["a"]["updates"] == 2 and clients["a"]["slice"] == "2"
    assert clients["a"]["slices"] == "1-4" and clients["a"]["loss"] == 0.125
    assert clients["a"]["retries"] == 1 and "last_seen" in clients["a"]
    assert clients["b"]["updates"] == 1 and clients["b"]["slices"] == "5-8"
    # The plan's logical clients are listed too, with their samples and label mix.
    assert clients["client-1"]["samples"] == 20000 and len(clients["client-1"]["labels"]) == 10
    assert status["mode"] == "async" and status["partition"]["PARTITION"] == "slices"
    history = status["history"]
    assert [(h["client_id"], h["version"], h["samples"]) for h in history] == [
        ("a", 1, 100),
        ("b", 2, 50),
        ("a", 3, 100),
    ]
    assert status["last_checkpoint"]["version"] == 2
    assert "path" not in status["last_checkpoint"]  # no server folders in a public answer
    assert status["unsaved_updates"] == 1 and status["updates"] == 3


def test_readers_see_whole_consistent_snapshots_under_concurrent_updates(client) -> None:
    errors: list[str] = []

    def writer(k: int) -> None:
        for i in range(5):
            response = post(client, upload(float(k), client_id=f"w{k}", update_id=f"{k}-{i}"))
            if response.status_code != 200:
                errors.append(response.get_data(as_text=True))

    def reader() -> None:
        for _ in range(20):
            response = client.get("/v1/model")
            got, meta = weights.decode(response.data)
            if not response.headers["ETag"].startswith(f'"{meta["version"]}-'):
                errors.append(f"ETag {response.headers['ETag']} for version {meta['version']}")
            weights.validate(got, state_of(client.application).layout)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    threads += [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert client.get("/healthz").get_json()["version"] == 15


# --- what became of an update ---------------------------------------------------------


def lookup(client: FlaskClient, update_id: str, seq: int | None = None):
    query = f"?seq={seq}" if seq is not None else ""
    return client.get(f"/v1/updates/{update_id}{query}")


def test_update_applied_then_saved_by_save_model(make_app) -> None:
    client = make_app(SAVE_MODEL=2).test_client()
    assert post(client, upload(1.0, update_id="u1")).get_json()["seq"] == 1
    answer = lookup(client, "u1")
    assert answer.status_code == 200
    assert answer.get_json() == {"update_id": "u1", "state": "applied", "version": 1, "seq": 1}
    post(client, upload(1.0, update_id="u2", base_version=1))  # checkpoint v2
    assert lookup(client, "u1").get_json()["state"] == "saved"
    assert lookup(client, "u2").get_json() == {
        "update_id": "u2",
        "state": "saved",
        "version": 2,
        "seq": 2,
    }


def test_update_saved_after_an_idle_save(make_app, clock) -> None:
    app = make_app(SAVE_MODEL=10, IDLE_SAVE_SECONDS=5)
    client = app.test_client()
    post(client, upload(1.0, update_id="idle"))
    state_of(app).tick()
    assert lookup(client, "idle").get_json()["state"] == "applied"
    clock.advance(5)
    state_of(app).tick()
    assert lookup(client, "idle").get_json()["state"] == "saved"


def test_unknown_update_is_404_and_not_forgotten(client: FlaskClient) -> None:
    post(client, upload(1.0, update_id="known"))
    for answer in (lookup(client, "never-sent"), lookup(client, "never-sent", seq=1)):
        assert answer.status_code == 404
        body = answer.get_json()
        assert body["error"] == "unknown_update" and body["detail"]
        assert body["forgotten"] is False and body["remembered_from"] == 1


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v1/updates/" + "x" * 129, "bad_update_id"),
        ("/v1/updates/bad%0Aid", "bad_update_id"),
        ("/v1/updates/u1?seq=abc", "bad_seq"),
        ("/v1/updates/u1?seq=0", "bad_seq"),
    ],
)
def test_bad_update_lookup_is_400(client: FlaskClient, path: str, code: str) -> None:
    answer = client.get(path)
    assert answer.status_code == 400
    assert answer.get_json()["error"] == code and answer.get_json()["detail"]


def test_ids_restored_from_a_checkpoint_are_saved(make_app) -> None:
    first = make_app(SAVE_MODEL=10)
    post(first.test_client(), upload(1.0, update_id="u1"))
    post(first.test_client(), upload(1.0, update_id="u2", base_version=1))
    state_of(first).close()  # a graceful stop checkpoints v2
    client = make_app(SAVE_MODEL=10).test_client()
    assert lookup(client, "u1").get_json() == {
        "update_id": "u1",
        "state": "saved",
        "version": 2,  # the restored checkpoint's version, which holds it
        "seq": 1,
    }
    assert lookup(client, "u2").get_json()["seq"] == 2
    # Numbers go on from the checkpoint's count.
    assert post(client, upload(1.0, update_id="u3", base_version=2)).get_json()["seq"] == 3


def test_forgotten_after_a_restart_versus_lost_in_it(make_app, monkeypatch) -> None:
    # Prepare: checkpoints keep only the 2 most recent ids; v3 is saved, v4 is not.
    monkeypatch.setattr("fedsim.aggregator.state.SAVED_IDS", 2)
    first = make_app(SAVE_MODEL=3)
    for i in range(1, 5):
        post(first.test_client(), upload(1.0, update_id=f"u{i}", base_version=i - 1))
    # Execute: a hard kill; the new process resumes from v3.
    client = make_app(SAVE_MODEL=3).test_client()
    # Assert: u1 (seq 1) is older than what the checkpoint remembers: forgotten, saved.
    old = lookup(client, "u1", seq=1)
    assert old.status_code == 404
    assert old.get_json()["forgotten"] is True and old.get_json()["remembered_from"] == 2
    assert lookup(client, "u2", seq=2).get_json()["state"] == "saved"
    # u4 (seq 4) was accepted after the checkpoint: lost, and safe to push again.
    lost = lookup(client, "u4", seq=4)
    assert lost.status_code == 404 and lost.get_json()["forgotten"] is False
    # Without its seq an unknown id is never called forgotten.
    assert lookup(client, "u1").get_json()["forgotten"] is False


# --- tasks and rounds through the API ------------------------------------------------


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


ROUNDS = {"AGGREGATION": "fedavg", "PARTITION": "iid", "NUM_CLIENTS": 10, "CLIENTS_PER_ROUND": 2}


def test_a_round_hands_out_its_sampled_clients_then_closes_with_their_mean(make_app) -> None:
    client = make_app(**ROUNDS, ROUNDS=3).test_client()
    evaluation = ask(client)["task"]
    assert evaluation["kind"] == "evaluate" and evaluation["version"] == 0  # scored first
    a, b = ask(client)["task"], ask(client, "wk-2")["task"]
    assert a["kind"] == b["kind"] == "train" and a["round"] == b["round"] == 1
    assert a["id"] == f"r1.c{a['client'].split('-')[1]}" and a["client"] != b["client"]
    assert a["train"]["epochs"] == 5 and a["partition"]["PARTITION"] == "iid"
    idle = ask(client, "wk-3")
    assert idle["task"] is None and not idle["finished"] and "round 1" in idle["reason"]
    # The first update waits in the round; a retry of it is acknowledged, not counted.
    first = post(client, answer(a, 1.0, num_samples=100))
    assert first.get_json() == {"accepted": True, "version": 0, "duplicate": False, "seq": None}
    assert post(client, answer(a, 1.0, num_samples=100)).get_json()["duplicate"] is True
    assert client.get(f"/v1/updates/{a['id']}").get_json()["state"] == "pending"
    # The second closes it: (100 * 1 + 300 * 5) / 400 = 4.
    assert post(client, answer(b, 5.0, num_samples=300)).get_json()["version"] == 1
    got, _ = weights.decode(client.get("/v1/model").data)
    np.testing.assert_allclose(got["output/bias"], 4.0, rtol=1e-6)
    status = client.get("/v1/status").get_json()
    assert status["round"]["rounds_done"] == 1 and status["round"]["number"] == 2
    assert status["mode"] == "rounds"
    assert any("round 1 closed" in e["text"] for e in status["events"])
    # Round 1's model is scored next, before round 2's tasks.
    assert ask(client)["task"]["id"] == "eval.v1"


def test_the_same_seed_samples_the_same_clients_whatever_the_workers(make_app) -> None:
    def clients_of_round_one(workers: int) -> list[str]:
        client = make_app(
            **ROUNDS, ROUNDS=2, MODEL_DIR=f"/tmp/fedsim-test-{workers}-{id(make_app)}"
        ).test_client()
        got = []
        for i in range(4):
            task = ask(client, f"wk-{i % workers}")["task"]
            if task and task["kind"] == "train":
                got.append(task["client"])
        return sorted(got)

    assert clients_of_round_one(1) == clients_of_round_one(3)


def test_stale_and_finished_updates_are_409_and_change_nothing(make_app) -> None:
    client = make_app(**ROUNDS, ROUNDS=1, SAVE_MODEL=5).test_client()
    v0 = ask(client)["task"]  # the evaluation of version 0
    a, b = ask(client)["task"], ask(client)["task"]
    post(client, answer(a, 1.0))
    post(client, answer(b, 1.0))  # round 1 closes: version 1, the last round
    before = served(client)
    late = post(
        client, upload(2.0, client_id=a["client"], update_id="r1.cx", task="r1.cx", lease="ab")
    )
    assert late.status_code == 409 and late.get_json()["error"] == "unknown_task"
    again = post(client, answer(a, 3.0))  # already counted: acknowledged
    assert again.status_code == 200 and again.get_json()["duplicate"] is True
    assert served(client) == before
    status = client.get("/v1/status").get_json()
    assert status["finished"] is False  # version 1 is not scored yet
    evaluation = ask(client)["task"]
    assert evaluation["id"] == "eval.v1"
    for task in (evaluation, v0):
        done = client.post(
            "/v1/evaluations",
            json={
                "worker": "wk-1",
                "task": task["id"],
                "lease": task["lease"],
                "accuracy": 0.9,
                "loss": 0.3,
            },
        )
        assert done.status_code == 200
    assert ask(client)["finished"] is True
    assert client.get("/v1/status").get_json()["finished"] is True


def test_a_round_closes_on_its_timeout_with_what_arrived(make_app, clock) -> None:
    app = make_app(**ROUNDS, ROUND_TIMEOUT=30, ROUNDS=3)
    client = app.test_client()
    ask(client)
    a = ask(client)["task"]
    ask(client)  # b is handed out and never answered
    post(client, answer(a, 2.0))
    clock.advance(29)
    assert client.get("/healthz").get_json()["version"] == 0
    clock.advance(1)
    # A model download notices the deadline and closes the round first.
    assert client.get("/v1/model").headers["X-Fedsim-Version"] == "1"
    assert "timeout" in client.get("/v1/status").get_json()["events"][-1]["text"]


def test_an_expired_lease_goes_to_another_worker_and_the_late_result_is_refused(
    make_app, clock
) -> None:
    app = make_app(**ROUNDS, TASK_TIMEOUT=60, ROUNDS=3)
    client = app.test_client()
    ask(client)
    slow = ask(client, "slow")["task"]
    clock.advance(61)
    # Another worker asks: the expired task is handed out again, under a new lease.
    retaken = None
    for _ in range(3):
        task = ask(client, "fast")["task"]
        if task and task["id"] == slow["id"]:
            retaken = task
            break
    assert retaken is not None and retaken["lease"] != slow["lease"]
    before = served(client)
    late = post(client, answer(slow, 9.0))
    assert late.status_code == 409 and late.get_json()["error"] == "reassigned"
    assert "not counted" in late.get_json()["detail"]
    assert served(client) == before
    assert client.get("/v1/status").get_json()["pending_updates"] == 0
    assert post(client, answer(retaken, 1.0)).status_code == 200


def test_a_pending_update_lost_in_a_hard_kill_is_accepted_again(make_app) -> None:
    first = make_app(**ROUNDS, ROUNDS=3)
    client = first.test_client()
    ask(client)
    a = ask(client)["task"]
    assert post(client, answer(a, 2.0)).get_json()["duplicate"] is False
    # The restart forgets the open round; the same task's update counts once more.
    again = make_app(**ROUNDS, ROUNDS=3).test_client()
    assert again.get(f"/v1/updates/{a['id']}").status_code == 404
    assert post(again, answer(a, 2.0)).get_json()["duplicate"] is False
    assert again.get("/v1/status").get_json()["round"]["pending"] == 1


def test_rounds_and_slices_progress_survive_a_restart(make_app) -> None:
    app = make_app(**ROUNDS, ROUNDS=3, SAVE_MODEL=1)
    client = app.test_client()
    ask(client)
    a, b = ask(client)["task"], ask(client)["task"]
    post(client, answer(a, 1.0))
    post(client, answer(b, 1.0))
    again = make_app(**ROUNDS, ROUNDS=3, SAVE_MODEL=1).test_client()
    assert again.get("/v1/status").get_json()["round"]["rounds_done"] == 1
    assert again.get(f"/v1/updates/{a['id']}").get_json()["state"] == "saved"
    # Slices: a client's next slice after a restart is the one after its last saved one.
    app = make_app(SAVE_MODEL=1, MODEL_DIR=str(model_dir(app).parent / "slices"))
    client = app.test_client()
    ask(client)  # evaluation of v0
    task = ask(client)["task"]
    assert (task["id"], task["slice"], task["slices"]) == ("c1.s1", 1, "1-4")
    post(client, answer(task, 1.0))
    again = make_app(SAVE_MODEL=1, MODEL_DIR=str(model_dir(app))).test_client()
    assert ask(again)["task"]["id"] == "eval.v1"  # the restored version is scored first
    assert ask(again)["task"]["id"] == "c1.s2"


def test_a_task_update_is_checked_against_its_task(make_app) -> None:
    client = make_app(**ROUNDS, ROUNDS=3).test_client()
    ask(client)
    a = ask(client)["task"]
    before = served(client)
    too_many = post(client, answer(a, 1.0, num_samples=a["samples"] + 1))
    assert too_many.status_code == 422 and too_many.get_json()["error"] == "bad_num_samples"
    other = upload(1.0, client_id="client-99", update_id=a["id"], task=a["id"], lease=a["lease"])
    assert post(client, other).get_json()["error"] == "wrong_client"
    mismatch = upload(1.0, client_id=a["client"], update_id="x", task=a["id"], lease=a["lease"])
    assert post(client, mismatch).status_code == 400
    free = post(client, upload(1.0, client_id="typed"))
    assert free.status_code == 409 and free.get_json()["error"] == "no_task"
    assert served(client) == before


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/tasks", b"not json", 400, "bad_json"),
        ("/v1/tasks", b"[1]", 400, "bad_json"),
        ("/v1/tasks", b'{"worker": ""}', 400, "bad_worker"),
        ("/v1/tasks", '{"worker": "a\u2028b"}'.encode(), 400, "bad_worker"),
        ("/v1/tasks", b"[" * 5000, 413, "too_large"),
        ("/v1/workers", b"{}", 400, "bad_worker"),
        (
            "/v1/evaluations",
            b'{"worker": "w", "task": "eval.v0", "lease": "ab"}',
            400,
            "bad_metrics",
        ),
        (
            "/v1/evaluations",
            b'{"worker": "w", "task": "eval.v0", "lease": "ab", "accuracy": 2, "loss": 1}',
            400,
            "bad_metrics",
        ),
        (
            "/v1/evaluations",
            b'{"worker": "w", "task": "eval.v0", "lease": "ab", "accuracy": 0.5, "loss": 1}',
            409,
            "reassigned",
        ),
        (
            "/v1/evaluations",
            b'{"worker": "w", "task": "eval.v7", "lease": "ab", "accuracy": 0.5, "loss": 1}',
            409,
            "task_done",
        ),
    ],
)
def test_bad_task_requests_are_4xx(client, path: str, body: bytes, status: int, code: str) -> None:
    ask(client)  # leases eval.v0 to wk-1
    response = client.post(path, data=body, content_type="application/json")
    assert response.status_code == status
    assert response.get_json()["error"] == code
    assert client.get("/v1/history").get_json() == {"history": []}


def test_history_json_and_csv(make_app) -> None:
    client = make_app().test_client()
    task = ask(client)["task"]
    body = {
        "worker": "wk-1",
        "task": task["id"],
        "lease": task["lease"],
        "accuracy": 0.1,
        "loss": 2.3,
    }
    assert client.post("/v1/evaluations", json=body).get_json()["recorded"] is True
    again = client.post("/v1/evaluations", json=body)
    assert again.status_code == 409  # scored once
    entries = client.get("/v1/history").get_json()["history"]
    assert [(e["version"], e["accuracy"], e["round"]) for e in entries] == [(0, 0.1, None)]
    csv = client.get("/v1/history?format=csv").get_data(as_text=True).splitlines()
    assert csv[0] == "version,round,time,accuracy,loss,samples,updates,clients"
    assert csv[1].startswith("0,,") and ",0.1,2.3,0,0," in csv[1]
    assert client.get("/v1/history?format=xml").status_code == 400


def test_past_versions_are_served_for_their_evaluation(make_app) -> None:
    client = make_app(EVAL_EVERY=1).test_client()
    ask(client)  # eval.v0 leased, not answered
    post(client, upload(3.0))  # version 1 (wants eval.v1 too)
    old = client.get("/v1/model?version=0")
    assert old.status_code == 200 and old.headers["X-Fedsim-Version"] == "0"
    assert client.get("/v1/model?version=5").status_code == 404
    assert client.get("/v1/model?version=x").status_code == 400


# --- disk faults ----------------------------------------------------------------------


def test_a_failing_disk_refuses_new_updates_with_503_and_recovers(make_app, monkeypatch) -> None:
    import errno

    app = make_app(SAVE_MODEL=1)
    client = app.test_client()
    real_save = checkpoints.save

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    # Prepare: the disk fills up; an update is accepted but its checkpoint fails.
    monkeypatch.setattr(checkpoints, "save", full_disk)
    assert post(client, upload(1.0, update_id="kept")).status_code == 200
    health = client.get("/healthz").get_json()
    assert health["status"] == "degraded" and "No space left" in health["detail"]
    # Execute: the next update is refused with 503 and changes nothing.
    before = served(client)
    refused = post(client, upload(5.0, update_id="later"))
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
    assert refused.get_json()["error"] == "unavailable"
    assert served(client) == before
    assert any("failed" in e["text"] for e in client.get("/v1/status").get_json()["events"])
    # The disk works again: the next tick saves the acknowledged update, and updates flow.
    monkeypatch.setattr(checkpoints, "save", real_save)
    state_of(app).tick()
    assert client.get("/healthz").get_json()["status"] == "ok"
    assert checkpoints.load_newest(model_dir(app)).version == 1
    assert lookup(client, "kept").get_json()["state"] == "saved"
    assert post(client, upload(5.0, update_id="later")).status_code == 200


# --- tokens ---------------------------------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({"Authorization": ""}, 401, "unauthorized"),
        ({"Authorization": "Basic abc"}, 401, "unauthorized"),
        (bearer("ef" * 32), 403, "forbidden"),
    ],
)
def test_requests_that_change_state_need_a_known_token(client, headers, status, code) -> None:
    before = served(client)
    for response in (
        post(client, upload(3.0), headers=headers),
        client.post("/v1/tasks", json={"worker": "w"}, headers=headers),
        client.post("/v1/workers", json={"worker": "w"}, headers=headers),
        client.post("/v1/evaluations", json={"worker": "w"}, headers=headers),
    ):
        assert response.status_code == status, response.get_json()
        assert response.get_json()["error"] == code
    assert served(client) == before
    assert client.get("/v1/status").get_json()["workers"] == []


def test_a_token_speaks_only_for_its_clients(client) -> None:
    before = served(client)
    as_other = post(client, upload(3.0, client_id="client-1"), headers=bearer(TYPED_TOKEN))
    assert as_other.status_code == 403
    assert "may not speak for client client-1" in as_other.get_json()["detail"]
    tasks = client.post("/v1/tasks", json={"worker": "w"}, headers=bearer(TYPED_TOKEN))
    assert tasks.status_code == 403 and "not a workers' token" in tasks.get_json()["detail"]
    assert served(client) == before
    own = post(client, upload(3.0, client_id="typed"), headers=bearer(TYPED_TOKEN))
    assert own.status_code == 200


def test_reads_are_open_unless_auth_reads(make_app) -> None:
    open_client = make_app().test_client()
    assert open_client.get("/v1/status", headers={"Authorization": ""}).status_code == 200
    guarded = make_app(AUTH_READS="true", MODEL_DIR="/tmp/fedsim-auth-reads").test_client()
    for path in ("/v1/status", "/v1/model", "/v1/history", "/metrics", "/"):
        assert guarded.get(path, headers={"Authorization": ""}).status_code == 401, path
    assert guarded.get("/healthz", headers={"Authorization": ""}).status_code == 200
    assert guarded.get("/v1/status").status_code == 200  # with the workers' token
    page = guarded.get("/?access_token=" + "ab" * 32, headers={"Authorization": ""})
    assert page.status_code == 200


def test_the_aggregator_refuses_to_start_without_tokens(make_app, make_settings, caplog) -> None:
    settings = make_settings()
    write_v0(settings.model_dir)
    write_plan(settings)
    with pytest.raises(SystemExit):
        create_app({"TESTING": True, "FEDSIM_SETTINGS": settings, "FEDSIM_TICKER": False})
    assert "no tokens file at" in caplog.text and "fedsim.prepare" in caplog.text


def test_a_token_added_while_running_works_at_once(make_app) -> None:
    from fedsim import tokens

    app = make_app()
    client = app.test_client()
    path = state_of(app).settings.tokens_file
    token = tokens.add(path, "alice", [])
    response = post(client, upload(1.0, client_id="alice"), headers=bearer(token.secret))
    assert response.status_code == 200
    path.write_text("not json")  # broken meanwhile: the tokens that worked keep working
    again = post(client, upload(2.0, client_id="alice"), headers=bearer(token.secret))
    assert again.status_code == 200


def test_versions_waiting_for_a_score_are_bounded_in_memory(make_app, caplog) -> None:
    from fedsim.aggregator.state import MAX_WAITING_EVALUATIONS

    client = make_app(EVAL_EVERY=1).test_client()
    for i in range(20):  # no worker scores anything
        post(client, upload(float(i), update_id=f"u{i}"))
    waiting = client.get("/v1/status").get_json()["evaluations_pending"]
    assert len(waiting) == MAX_WAITING_EVALUATIONS and waiting[-1] == 20
    assert len(state_of(client.application)._kept) == MAX_WAITING_EVALUATIONS
    assert "evaluation of v0 skipped" in caplog.text
    assert client.get("/v1/model?version=1").status_code == 404


def test_the_aggregator_refuses_a_plan_made_with_other_settings(make_settings, caplog) -> None:
    made = make_settings(PARTITION="iid", NUM_CLIENTS=10)
    write_v0(made.model_dir)
    write_plan(made)
    write_tokens(made)
    settings = make_settings()  # the default: PARTITION=slices
    with pytest.raises(SystemExit):
        create_app({"TESTING": True, "FEDSIM_SETTINGS": settings, "FEDSIM_TICKER": False})
    assert "does not match the settings: PARTITION is slices here, iid in" in caplog.text
    assert "reset with `docker compose down -v`" in caplog.text


# --- what a review of the rules and the queue found -----------------------------------


def test_a_buffered_update_sent_twice_counts_once(make_app) -> None:
    client = make_app(AGGREGATION="fedbuff", FEDBUFF_K=5).test_client()
    body = upload(1.0, update_id="held-1", num_samples=10)
    assert post(client, body).get_json()["duplicate"] is False
    assert post(client, body).get_json()["duplicate"] is True
    status = client.get("/v1/status").get_json()
    assert status["pending_updates"] == 1 and status["version"] == 0
    assert lookup(client, "held-1").get_json()["state"] == "pending"


def test_huge_weights_are_refused_before_any_rule_sees_them(client) -> None:
    before = served(client)
    big = tensors("mlp", 3e38)
    response = post(client, upload(tensors_=big))
    assert response.status_code == 422 and "beyond 1e+06" in response.get_json()["detail"]
    assert served(client) == before


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/model?version=\u00b2", None),
        (
            "/v1/evaluations",
            b'{"worker": "w", "task": "eval.v0", "lease": "ab", "accuracy": 1'
            + b"0" * 400
            + b', "loss": 1}',
        ),
    ],
)
def test_odd_numbers_are_400_not_500(client, path: str, body: bytes | None) -> None:
    if body is None:
        response = client.get(path)
    else:
        response = client.post(path, data=body, content_type="application/json")
    assert response.status_code == 400


def test_another_rule_on_the_same_models_starts_its_work_afresh(make_app) -> None:
    first = make_app(SAVE_MODEL=1).test_client()
    ask(first)  # the evaluation of version 0
    task = ask(first)["task"]
    assert post(first, answer(task, 1.0)).status_code == 200
    # The same MODEL_DIR under fedasync: the model is kept, the task ids are this run's own.
    again = make_app(SAVE_MODEL=1, AGGREGATION="fedasync").test_client()
    ask(again)
    retaken = ask(again)["task"]
    assert retaken["id"] == task["id"]
    response = post(again, answer(retaken, 2.0))
    assert response.get_json()["duplicate"] is False
