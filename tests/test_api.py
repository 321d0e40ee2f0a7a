"""The aggregator's HTTP routes through Flask's test client, with a fake clock and no
TensorFlow: health, the model and its ETag, unknown routes, the history, past versions,
and whole snapshots under concurrent reads and writes."""

from __future__ import annotations

import threading

import numpy as np
from flask.testing import FlaskClient

from fedsim import weights
from fedsim.aggregator.snapshot import Snapshot
from helpers import ask, post, served, state_of, tensors, upload

# --- routes ---------------------------------------------------------------------------


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


def test_model_is_encoded_once_per_version_downloaded_not_per_request(client, monkeypatch) -> None:
    calls = []
    real = Snapshot._encode
    monkeypatch.setattr(Snapshot, "_encode", lambda *a: calls.append(a[0].version) or real(*a))
    first = client.get("/v1/model").data  # version 0, encoded on its first download
    assert client.get("/v1/model").data == first
    assert calls == [0]
    post(client, upload(1.0))  # version 1: never downloaded, never encoded
    post(client, upload(2.0))
    for _ in range(3):
        client.get("/v1/model")
    assert calls == [0, 2]
    assert weights.decode(client.get("/v1/model").data)[1]["version"] == "2"


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


# --- history and past versions --------------------------------------------------------


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
    assert csv[0] == "version,round,time,sim_seconds,accuracy,loss,samples,updates,clients"
    assert csv[1].startswith("0,,") and ",0.1,2.3,0,0," in csv[1]
    assert client.get("/v1/history?format=xml").status_code == 400


def test_history_by_pages_after_a_version_at_most_limit_entries(make_app) -> None:
    app = make_app()
    client = app.test_client()
    state = state_of(app)
    # Five scored versions, recorded out of order as evaluation tasks may finish.
    state.evaluations.entries = [
        {"version": v, "round": v or None, "time": "2026-01-01T00:00:00+00:00",
         "accuracy": v / 10, "loss": 1.0, "samples": 0, "updates": v, "clients": []}
        for v in (0, 1, 3, 2, 4)
    ]  # fmt: skip

    def versions(query: str) -> tuple[list[int], int | None]:
        answer = client.get("/v1/history" + query).get_json()
        return [e["version"] for e in answer["history"]], answer.get("next")

    assert versions("") == ([0, 1, 2, 3, 4], None)
    assert versions("?after=1") == ([2, 3, 4], None)
    assert versions("?limit=2") == ([0, 1], 1)
    assert versions("?after=1&limit=2") == ([2, 3], 3)
    assert versions("?after=3&limit=2") == ([4], None)
    assert versions("?after=4") == ([], None)
    csv = client.get("/v1/history?format=csv&after=3").get_data(as_text=True).splitlines()
    assert len(csv) == 2 and csv[1].startswith("4,4,")
    for query, code in (("after=-1", "bad_after"), ("after=x", "bad_after"),
                        ("limit=0", "bad_limit"), ("limit=1.5", "bad_limit")):  # fmt: skip
        bad = client.get("/v1/history?" + query)
        assert bad.status_code == 400 and bad.get_json()["error"] == code
        assert "ASCII digits" in bad.get_json()["detail"]


def test_status_shows_at_most_500_clients_the_most_recently_seen_unless_asked(make_app) -> None:
    app = make_app(PARTITION="iid", NUM_CLIENTS=1200, CLIENTS_PER_ROUND=10)
    client = app.test_client()
    rows = state_of(app).clients  # seen by the views as the dashboard's rows
    rows.record("client-1100")["last_seen"] = "2026-01-01T00:00:02+00:00"
    rows.record("client-900")["last_seen"] = "2026-01-01T00:00:01+00:00"

    status = client.get("/v1/status").get_json()

    ids = [c["id"] for c in status["clients"]]
    assert status["clients_total"] == 1200 and len(ids) == 500
    # The two seen first, then the unseen in the plan's order, all listed in the plan's order.
    assert ids == [f"client-{n}" for n in range(1, 499)] + ["client-900", "client-1100"]
    assert len(client.get("/v1/status?clients=all").get_json()["clients"]) == 1200
    assert [c["id"] for c in client.get("/v1/status?clients=1").get_json()["clients"]] == [
        "client-1100"
    ]
    bad = client.get("/v1/status?clients=-1")
    assert bad.status_code == 400 and bad.get_json()["error"] == "bad_clients"


def test_past_versions_are_served_for_their_evaluation(make_app) -> None:
    client = make_app(EVAL_EVERY=1).test_client()
    ask(client)  # eval.v0 leased, not answered
    post(client, upload(3.0))  # version 1 (wants eval.v1 too)
    old = client.get("/v1/model?version=0")
    assert old.status_code == 200 and old.headers["X-Fedsim-Version"] == "0"
    assert client.get("/v1/model?version=5").status_code == 404
    assert client.get("/v1/model?version=x").status_code == 400


# --- concurrency ----------------------------------------------------------------------


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


# --- COMPRESSION_DOWN=fp16: the model in half precision, its own ETag ---------------------


def test_fp16_model_has_its_own_etag_and_bytes(make_app) -> None:
    client = make_app(COMPRESSION_DOWN="fp16").test_client()
    assert post(client, upload(0.1)).status_code == 200
    full = client.get("/v1/model")
    half = client.get("/v1/model?encoding=fp16")
    assert half.status_code == 200 and half.headers["X-Fedsim-Version"] == "1"
    assert half.headers["ETag"] != full.headers["ETag"]
    assert half.headers["ETag"].startswith('"1-')
    got, meta = weights.decode(half.data, dtypes=("F16",))
    assert meta == {"version": "1", "samples": "100", "model": "mlp", "encoding": "fp16"}
    assert got["hidden1/kernel"].dtype == np.float16
    assert np.array_equal(got["hidden1/kernel"], np.full((784, 200), 0.1, np.float16))
    assert len(half.data) < len(full.data) / 1.99  # 2 bytes a weight, not 4, and the header
    # Each ETag answers 304 for its own encoding only.
    again = client.get("/v1/model?encoding=fp16", headers={"If-None-Match": half.headers["ETag"]})
    assert again.status_code == 304
    other = client.get("/v1/model", headers={"If-None-Match": half.headers["ETag"]})
    assert other.status_code == 200


def test_fp16_model_counts_its_own_bytes_sent(make_app) -> None:
    app = make_app(COMPRESSION_DOWN="fp16")
    client = app.test_client()
    size = len(client.get("/v1/model?encoding=fp16").data)
    metrics = client.get("/metrics").get_data(as_text=True)
    assert f"fedsim_sent_bytes_total {float(size)}" in metrics


def test_fp16_model_is_refused_without_compression_down_and_odd_encodings(client) -> None:
    refused = client.get("/v1/model?encoding=fp16")
    assert refused.status_code == 400 and "COMPRESSION_DOWN=fp16" in refused.get_json()["detail"]
    odd = client.get("/v1/model?encoding=int8")
    assert odd.status_code == 400 and odd.get_json()["error"] == "bad_encoding"
