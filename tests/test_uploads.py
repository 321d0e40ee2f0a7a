"""Refused uploads through the API: every 400, 413 and 422 leaves the model, version, samples
and the set of known update ids as they were; odd numbers are 400s, not 500s."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from flask.testing import FlaskClient

from fedsim import models, tokens, weights
from fedsim.pipeline import compress
from helpers import (
    answer,
    ask,
    bearer,
    model_dir,
    post,
    served,
    st_bytes,
    state_of,
    tensors,
    upload,
)

LAYOUT = models.SHAPES["mlp"]

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


# --- numbers: ASCII digits alone ------------------------------------------------------------

LENIENT = [
    "5000\n",
    " 5000",
    "5000 ",
    "+5000",
    "5_000",
    "\u0665\u0660\u0660\u0660",
    "\uff15\uff10\uff10\uff10",
]


@pytest.mark.parametrize(
    "raw", LENIENT, ids=["newline", "space", "trailing", "sign", "_", "ar", "fw"]
)
def test_a_count_that_int_would_take_is_refused(client, after_one_update, raw: str) -> None:
    sample_count = post(client, upload(update_id="bad", base_version=1, num_samples=raw))
    assert sample_count.status_code == 422
    assert sample_count.get_json()["error"] == "bad_num_samples"
    assert f"got {raw!r} (ASCII digits alone" in sample_count.get_json()["detail"]
    version = post(client, upload(update_id="bad", base_version=raw.replace("5000", "1")))
    assert version.status_code == 400 and version.get_json()["error"] == "bad_metadata"
    assert "base_version must be an integer >= 0" in version.get_json()["detail"]
    retries = post(client, upload(update_id="bad", base_version=1, retries=raw))
    assert retries.status_code == 400 and "retries must be" in retries.get_json()["detail"]
    assert_error_changed_nothing(client, after_one_update, "bad")


@pytest.mark.parametrize("raw", ["+1", " 1", "1_0", "\u0661", "\uff11"])
def test_numbers_in_the_query_are_ascii_digits_too(client, after_one_update, raw: str) -> None:
    version = client.get("/v1/model", query_string={"version": raw})
    assert version.status_code == 400 and version.get_json()["error"] == "bad_version"
    seq = client.get("/v1/updates/u1", query_string={"seq": raw})
    assert seq.status_code == 400 and seq.get_json()["error"] == "bad_seq"
    assert served(client) == after_one_update


# --- claims to a task: only its lease holder's result counts ------------------------------


def saved_files(app) -> dict[str, str]:
    """What MODEL_DIR holds: each file's name and a digest of its bytes."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(model_dir(app).iterdir())
        if p.is_file()
    }


def squat(client: FlaskClient, token: str, task_id: str, lease: str) -> list:
    """What a client holding `token` (for "typed" and client-2) tries with `task_id`."""
    headers = bearer(token)
    return [
        # Its own client id, the task's id as its update id, no task.
        post(client, upload(4.0, client_id="typed", update_id=task_id), headers=headers),
        # The task's client, the task's id, and a lease of its own making.
        post(
            client,
            upload(4.0, client_id="client-2", update_id=task_id, task=task_id, lease=lease),
            headers=headers,
        ),
    ]


def assert_squat_refused(responses: list, task_id: str) -> None:
    no_task, forged = responses
    assert no_task.status_code == 403 and no_task.get_json()["error"] == "reserved_id"
    assert f"update_id {task_id} is spelt as a task id" in no_task.get_json()["detail"]
    assert forged.status_code == 409 and forged.get_json()["error"] == "not_leased"
    assert f"not handed out with task {task_id}" in forged.get_json()["detail"]


def test_a_restricted_client_cannot_take_a_task_before_or_after_it_is_handed_out(
    make_app, make_settings
) -> None:
    # Prepare: the default plan (client-2 trains slices 5-8: its first task is c2.s5), a
    # checkpoint per update, and a token for "typed" and client-2.
    app = make_app(SAVE_MODEL=1)
    client = app.test_client()
    secret = tokens.add(state_of(app).settings.tokens_file, "squatter", ["typed", "client-2"])
    before, files = served(client), saved_files(app)

    # Before any worker asked for it, and with a task never handed out.
    assert_squat_refused(squat(client, secret.secret, "c2.s5", "a" * 64), "c2.s5")
    assert_squat_refused(squat(client, secret.secret, "c2.s6", "a" * 64), "c2.s6")
    assert served(client) == before and saved_files(app) == files

    # After: the task is handed out; its lease is the worker's alone.
    handed = [ask(client, f"wk-{n}")["task"] for n in range(4)]
    task = next(t for t in handed if t["id"] == "c2.s5")
    other = next(t for t in handed if t["kind"] == "train" and t["id"] != "c2.s5")
    assert_squat_refused(squat(client, secret.secret, "c2.s5", other["lease"]), "c2.s5")
    assert served(client) == before and saved_files(app) == files

    # The worker's result counts once, and a repeat from it is acknowledged.
    first = post(client, answer(task, 1.0))
    assert first.get_json() == {"accepted": True, "version": 1, "duplicate": False, "seq": 1}
    again = post(client, answer(task, 1.0))
    assert again.status_code == 200 and again.get_json()["duplicate"] is True
    # Once done, the task still answers a squatter with a refusal, never "duplicate".
    after = served(client)
    assert_squat_refused(squat(client, secret.secret, "c2.s5", other["lease"]), "c2.s5")
    assert served(client) == after


def test_another_tasks_lease_does_not_carry_over(client) -> None:
    handed = [ask(client, f"wk-{n}")["task"] for n in range(3)]
    one, two = (t for t in handed if t["kind"] == "train")
    before = served(client)
    swapped = post(client, answer({**two, "lease": one["lease"]}, 5.0))
    assert swapped.status_code == 409 and swapped.get_json()["error"] == "not_leased"
    report = client.post(
        "/v1/evaluations",
        json={"worker": "wk-0", "task": "eval.v0", "lease": one["lease"], "accuracy": 1, "loss": 0},
    )
    assert report.status_code == 409 and report.get_json()["error"] == "not_leased"
    assert served(client) == before and client.get("/v1/history").get_json() == {"history": []}


def test_a_lease_survives_a_restart(make_app) -> None:
    # Prepare: a task handed out, then the aggregator restarts before its result arrives.
    app = make_app(SAVE_MODEL=1)
    client = app.test_client()
    task = next(
        t for t in (ask(client, f"wk-{n}")["task"] for n in range(2)) if t["kind"] == "train"
    )
    again = make_app(SAVE_MODEL=1, MODEL_DIR=str(model_dir(app))).test_client()
    # The worker pushes from its outbox: the lease is recognised, the result counts once.
    first = post(again, answer(task, 1.0))
    assert first.status_code == 200 and first.get_json()["duplicate"] is False
    repeat = post(
        make_app(SAVE_MODEL=1, MODEL_DIR=str(model_dir(app))).test_client(), answer(task, 1.0)
    )
    assert repeat.status_code == 200 and repeat.get_json()["duplicate"] is True


# --- compressed uploads (COMPRESSION): decoded onto their base, every bound re-checked ---


def compressed(codec: str, fill: float = 0.01, **meta: object) -> bytes:
    """A worker's body under COMPRESSION=`codec` for a delta of `fill` from version 0 (zeros)."""
    delta = tensors("mlp", fill)
    wire = compress.encode(codec, delta, 0.01)
    return upload(tensors_=wire, codec=compress.WIRE_NAMES[codec], wire=True, **meta)


@pytest.mark.parametrize("codec", ["fp16", "int8", "topk"])
def test_a_compressed_update_is_decoded_onto_its_base(make_app, codec: str) -> None:
    client = make_app(COMPRESSION=codec).test_client()
    response = post(client, compressed(codec, 0.25, num_samples=100))
    assert response.status_code == 200, response.get_json()
    got, _ = weights.decode(client.get("/v1/model").data)
    delta = compress.decode(codec, compress.encode(codec, tensors("mlp", 0.25), 0.01), LAYOUT, 0.01)
    for name, _ in LAYOUT:  # version 0 is zeros; the first update of async-weighted is the model
        np.testing.assert_array_equal(got[name], delta[name])


def _int8_with(name: str, value: np.ndarray) -> bytes:
    wire = {**compress.encode("int8", tensors("mlp", 0.01)), name: value}
    return upload(update_id="bad", tensors_=wire, codec="int8", wire=True)


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        (_int8_with("output/bias:scale", np.float32(np.inf)), 422, "tensor output/bias:scale"),
        (_int8_with("output/bias", np.full(10, -128, np.int8)), 422, "tensor output/bias holds"),
        (_int8_with("output/bias", np.zeros(10, np.int32)), 422, "is I32, expected F32 or I8"),
        (upload(update_id="bad", codec="fp16"), 422, "the upload says codec 'fp16'"),
        (upload(update_id="bad"), 422, "the upload says codec none"),
        (compressed("int8", update_id="bad", base_version=7), 409, "base version 7"),
        (compressed("int8", update_id="bad")[:-3], 400, "the body holds"),
    ],
    ids=["scale-inf", "code-128", "int32-codes", "other-codec", "uncompressed", "no-base", "cut"],
)
def test_a_bad_compressed_upload_changes_nothing(make_app, body, status, detail) -> None:
    client = make_app(COMPRESSION="int8").test_client()
    post(client, compressed("int8", num_samples=100))
    before = served(client)
    response = post(client, body)
    assert response.status_code == status
    assert detail in response.get_json()["detail"]
    assert served(client) == before
    ok = post(client, compressed("int8", update_id="bad", base_version=1))
    assert ok.get_json()["version"] == 2  # the refused id was not remembered


def test_topk_over_its_fraction_is_refused(make_app) -> None:
    client = make_app(COMPRESSION="topk", COMPRESSION_TOPK="0.001").test_client()
    before = served(client)
    response = post(client, compressed("topk"))  # made with 0.01: ten times the entries
    assert response.status_code == 422
    assert "entries, at most" in response.get_json()["detail"]
    assert served(client) == before


def _topk_with(**changes: np.ndarray) -> dict[str, np.ndarray]:
    return {**compress.encode("topk", tensors("mlp", 0.01), 0.01), **changes}


def _earlier_topk() -> dict[str, np.ndarray]:
    """The earlier top-k form: int32 indices and float32 values."""
    out = {}
    for name, shape in LAYOUT:
        idx = np.arange(compress.kept(0.01, int(np.prod(shape))), dtype=np.int32)
        out[name + ":index"], out[name + ":value"] = idx, np.ones(idx.size, np.float32)
    return out


@pytest.mark.parametrize(
    ("wire", "codec", "detail"),
    [
        (_earlier_topk(), "topk", "says codec 'topk': the earlier top-k form"),
        (_earlier_topk(), "topk16", "hidden1/kernel:index must be 1-D uint16 gaps, is int32"),
        (_topk_with(**{"hidden1/bias:index": np.array([5, 0], np.uint16)}), "topk16",
         "hidden1/bias:index has a gap of 0"),
        (_topk_with(**{"output/bias:index": np.array([10], np.uint16)}), "topk16",
         "output/bias:index reaches index 10"),
        (_topk_with(**{"output/bias:value": np.array([np.inf], np.float16)}), "topk16",
         "output/bias:value holds a value non-finite"),
        (_topk_with(**{"output/bias:value": np.ones(1, np.float32)}), "topk16",
         "output/bias:value must be float16"),
    ],
    ids=["earlier-form", "int32-indices", "zero-gap", "past-end", "inf", "float32-values"],
)  # fmt: skip
def test_a_bad_topk_upload_is_a_422_and_changes_nothing(make_app, wire, codec, detail) -> None:
    client = make_app(COMPRESSION="topk").test_client()
    before = served(client)
    body = upload(update_id="bad", tensors_=wire, codec=codec, wire=True)
    response = post(client, body)
    assert response.status_code == 422, response.get_json()
    assert response.get_json()["error"] == "invalid_weights"
    assert detail in response.get_json()["detail"]
    assert served(client) == before
    ok = post(client, compressed("topk", update_id="bad"))
    assert ok.status_code == 200 and ok.get_json()["version"] == 1  # the id was not kept
