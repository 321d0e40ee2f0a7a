"""What the aggregator tells about itself through the API: the status, and what became of an
update (applied, saved, unknown, forgotten after a restart or lost in it)."""

from __future__ import annotations

import gc
import tracemalloc

import pytest
from flask.testing import FlaskClient

from fedsim.aggregator.strategies import Update
from fedsim.aggregator.tasks import Client
from fedsim.aggregator.tasks.roster import Roster
from fedsim.aggregator.views import Clients
from helpers import lookup, post, state_of, upload

# --- status ---------------------------------------------------------------------------


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


# --- what became of an update ---------------------------------------------------------


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
    monkeypatch.setattr("fedsim.aggregator.ledger.SAVED_IDS", 2)
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


# --- the client rows ------------------------------------------------------------------


def _clients(n: int, attackers: list[str] = ()) -> Clients:  # the rows of a plan of n
    roster = Roster.of_clients([Client(i, 60, f"{i:064x}") for i in range(1, n + 1)])
    return Clients(roster, list(attackers))


def _seen(rows: Clients, client_id: str, stamp: str, **meta) -> None:
    rows.see(Update(client_id, f"u-{client_id}-{stamp}", 0, 60, {}, meta), 0, stamp)


def _most_recent(rows: list[dict], limit: int) -> list[dict]:
    """What /v1/status lists: the `limit` most recently seen (ties: the first), in order."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["last_seen"] or "", -i), reverse=True)
    return [rows[i] for i in sorted(order[:limit])]


def test_rows_of_clients_never_seen_come_from_the_plan() -> None:
    rows = _clients(5, attackers=["client-2"])

    _seen(rows, "client-4", "2026-01-01T00:00:01", loss=0.5)
    rows.dropped("client-3")
    rows.dropped("not-a-client")  # outside the plan: nothing to count

    by_id = {r["id"]: r for r in rows.rows()}
    assert [r["id"] for r in rows.rows()] == [f"client-{n}" for n in range(1, 6)]
    assert by_id["client-1"]["updates"] == 0 and by_id["client-1"]["samples"] == 60
    assert by_id["client-2"]["attacker"] and not by_id["client-1"]["attacker"]
    assert by_id["client-3"]["dropouts"] == 1 and by_id["client-3"]["last_seen"] is None
    assert by_id["client-4"]["updates"] == 1 and by_id["client-4"]["loss"] == 0.5
    by_id["client-4"]["updates"] = 99  # a copy: the record is not changed through it
    assert rows.record("client-4")["updates"] == 1


@pytest.mark.parametrize("limit", [1, 3, 7, 12, 40, None])
def test_the_rows_shown_are_the_most_recently_seen_then_the_plans_first(limit) -> None:
    rows = _clients(30)
    stamps = [f"2026-01-01T00:00:0{s}" for s in (3, 1, 3, 2, 5, 1, 4)]
    for n, stamp in zip((7, 2, 25, 11, 30, 3, 18), stamps, strict=True):
        _seen(rows, f"client-{n}", stamp)
    rows.dropped("client-1")  # seen, never updated: as the never seen
    _seen(rows, "typed", "2026-01-01T00:00:04")  # a hand-started client, after the plan's
    _seen(rows, "client-2", "2026-01-01T00:00:06")  # seen again: now the most recent

    shown, total = rows.shown(limit)

    assert total == 31
    assert shown == _most_recent(rows.rows(), 31 if limit is None else limit)


def test_10000_clients_never_seen_hold_no_row() -> None:
    gc.collect()
    tracemalloc.start()
    try:
        rows = _clients(10_000)
        gc.collect()
        base, _ = tracemalloc.get_traced_memory()
        for n in range(1, 11):
            _seen(rows, f"client-{n}", "2026-01-01T00:00:01")
        gc.collect()
        ten, _ = tracemalloc.get_traced_memory()
        shown, total = rows.shown(500)
    finally:
        tracemalloc.stop()

    assert total == 10_000 and len(shown) == 500
    assert base < 10_000 * (4 + 32 + 40) + 64_000  # the roster's columns, no row per client
    assert shown[0]["id"] == "client-1" and shown[-1]["id"] == "client-500"
    # Ten rows of about 1 kB each; the 9,990 never seen add nothing.
    assert ten - base < 10 * 2_000
