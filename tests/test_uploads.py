"""Refused uploads through the API: every 400, 413 and 422 leaves the model, version, samples
and the set of known update ids as they were; odd numbers are 400s, not 500s."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flask.testing import FlaskClient

from fedsim import weights
from helpers import post, served, st_bytes, state_of, tensors, upload

# --- errors never change the model, version, samples or dedup set ---------------------


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


# --- odd numbers ----------------------------------------------------------------------


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
