"""Tokens: the tokens file read, created and added to (fedsim.tokens and its command line),
and through the API who may change the aggregator's state, for which clients."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from fedsim import tokens
from fedsim.aggregator.app import create_app
from helpers import (
    TYPED_TOKEN,
    WORKERS_TOKEN,
    bearer,
    post,
    served,
    state_of,
    upload,
    write_plan,
    write_v0,
)

# --- through the API ------------------------------------------------------------------


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


# --- the tokens file ------------------------------------------------------------------


def test_ensure_creates_a_workers_token_once(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "tokens.json"
    assert tokens.ensure(path) is True
    [workers] = tokens.read(path)
    assert workers.name == "workers" and workers.for_workers and workers.speaks_for("anyone")
    assert re.fullmatch("[0-9a-f]{64}", workers.secret)
    assert tokens.ensure(path) is False  # kept as it is
    assert tokens.read(path) == [workers]
    assert tokens.workers_secret(path) == workers.secret


def test_added_tokens_speak_for_their_clients_only(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    tokens.ensure(path)
    alice = tokens.add(path, "alice", [])
    assert alice.clients == {"alice"} and not alice.for_workers
    assert alice.speaks_for("alice") and not alice.speaks_for("bob")
    lab = tokens.add(path, "lab", ["c1", "c2"])
    assert lab.speaks_for("c2") and not lab.speaks_for("lab")
    assert [t.name for t in tokens.read(path)] == ["workers", "alice", "lab"]
    assert len({t.secret for t in tokens.read(path)}) == 3
    with pytest.raises(tokens.TokenError, match="exists already"):
        tokens.add(path, "alice", [])
    with pytest.raises(tokens.TokenError, match="token name"):
        tokens.add(path, "a/b", [])


def test_find_matches_the_presented_secret_only(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    tokens.ensure(path)
    alice = tokens.add(path, "alice", [])
    known = tokens.read(path)
    assert tokens.find(known, alice.secret) == alice
    assert tokens.find(known, alice.secret[:-1]) is None
    assert tokens.find(known, "") is None


SECRET = "ab" * 32


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (None, "no tokens file at"),
        ("not json", "not a readable JSON tokens file"),
        ("[]", 'expected {"format": 1'),
        ('{"format": 2, "tokens": []}', 'expected {"format": 1'),
        ('{"format": 1, "tokens": []}', "no tokens"),
        ('{"format": 1, "tokens": [1]}', "token 1 is not an object"),
        (
            f'{{"format": 1, "tokens": [{{"name": "", "token": "{SECRET}", "clients": ["*"]}}]}}',
            "token 1 has no valid name",
        ),
        (
            '{"format": 1, "tokens": [{"name": "w", "token": "AB12", "clients": ["*"]}]}',
            "token 'w' must be 32-128 lowercase hex digits",
        ),
        (
            f'{{"format": 1, "tokens": [{{"name": "w", "token": "{SECRET}", "clients": []}}]}}',
            "token 'w' needs a list of client ids",
        ),
        (
            f'{{"format": 1, "tokens": [{{"name": "w", "token": "{SECRET}", "clients": ["*"]}},'
            f'{{"name": "v", "token": "{SECRET}", "clients": ["v"]}}]}}',
            "the same token appears twice",
        ),
    ],
    ids=[
        "missing",
        "not-json",
        "list",
        "format-2",
        "empty",
        "not-object",
        "name",
        "secret",
        "clients",
        "twice",
    ],
)
def test_a_malformed_file_is_refused_with_its_reason(
    tmp_path: Path, body: str | None, message: str
) -> None:
    path = tmp_path / "tokens.json"
    if body is not None:
        path.write_text(body)
    with pytest.raises(tokens.TokenError, match=re.escape(message)):
        tokens.read(path)


def test_the_workers_need_a_token_for_every_client(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(
        f'{{"format": 1, "tokens": [{{"name": "a", "token": "{SECRET}", "clients": ["a"]}}]}}'
    )
    with pytest.raises(tokens.TokenError, match=re.escape('no token for all clients ("*")')):
        tokens.workers_secret(path)


def test_the_store_reads_a_changed_file_and_keeps_the_last_good_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    tokens.ensure(path)
    store = tokens.Store(path)
    [workers] = store.tokens
    assert store.find(workers.secret) == workers
    assert store.find("ef" * 32) is None
    alice = tokens.add(path, "alice", [])
    assert store.find(alice.secret) == alice  # read again: the file changed
    path.write_text("not json")
    assert store.find(alice.secret) == alice and store.find(workers.secret) == workers


def test_the_command_line_inits_lists_and_adds(tmp_path: Path, capsys) -> None:
    path = tmp_path / "tokens.json"
    assert tokens.main(["--file", str(path), "init"]) == 0
    assert "created" in capsys.readouterr().out
    assert tokens.main(["--file", str(path), "init"]) == 0
    assert "exists already; left as it is" in capsys.readouterr().out
    assert tokens.main(["--file", str(path), "add", "lab", "--clients", "c1, c2"]) == 0
    out, err = capsys.readouterr()
    secret = out.strip()
    assert tokens.find(tokens.read(path), secret).clients == {"c1", "c2"}
    assert "added token 'lab' for c1, c2" in err and "CLIENT_TOKEN" in err
    assert tokens.main(["--file", str(path), "list"]) == 0
    listed = capsys.readouterr().out
    assert listed.splitlines() == ["workers: *", "lab: c1, c2"]
    assert secret not in listed  # names and client ids, never the secrets
    assert tokens.main(["--file", str(path), "add", "lab"]) == 1
    assert capsys.readouterr().err.startswith("fedsim tokens: error: ")


def test_the_file_is_owner_only_from_its_first_byte_whatever_the_umask(
    tmp_path: Path, monkeypatch
) -> None:
    path = tmp_path / "secrets" / "tokens.json"
    opened: list[tuple[str, int, int]] = []
    real_open = os.open

    def recording_open(file, flags, mode=0o777, *args, **kwargs):
        opened.append((os.fspath(file), flags, mode))
        return real_open(file, flags, mode, *args, **kwargs)

    def no_chmod(*args, **kwargs):
        raise AssertionError("the mode is set when the file is created, not changed after")

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(os, "fchmod", no_chmod)
    old = os.umask(0)
    try:
        tokens.ensure(path)
        tokens.add(path, "alice", [])
    finally:
        os.umask(old)

    created = [(f, mode) for f, flags, mode in opened if flags & os.O_CREAT]
    assert len(created) == 2 and all(Path(f).parent == path.parent for f, _ in created)
    assert all(mode == 0o600 for _, mode in created), created
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [t.name for t in tokens.read(path)] == ["workers", "alice"]


# --- the token travels in the Authorization header ----------------------------------------


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({"Authorization": ""}, "(not ?access_token=)"),
        ({"Authorization": "Bearer"}, "send `Authorization: Bearer <token>`"),
        ({"Authorization": "Bearer   "}, "send `Authorization: Bearer <token>`"),
        ({"Authorization": "Basic " + WORKERS_TOKEN}, "send `Authorization: Bearer <token>`"),
    ],
    ids=["query-only", "bare-bearer", "blank-bearer", "other-scheme"],
)
def test_a_token_in_the_query_never_changes_state(client, headers, detail) -> None:
    before = served(client)
    query = "?access_token=" + WORKERS_TOKEN
    for response in (
        client.post("/v1/updates" + query, data=upload(3.0), headers=headers),
        client.post("/v1/tasks" + query, json={"worker": "w"}, headers=headers),
        client.post("/v1/workers" + query, json={"worker": "w"}, headers=headers),
    ):
        assert response.status_code == 401, response.get_json()
        assert response.get_json()["error"] == "unauthorized"
        assert detail in response.get_json()["detail"]
    assert served(client) == before
    assert client.get("/v1/status").get_json()["workers"] == []


def test_a_read_takes_the_query_token_only_without_a_header(make_app) -> None:
    guarded = make_app(AUTH_READS="true").test_client()
    query = "/v1/status?access_token=" + WORKERS_TOKEN
    assert guarded.get(query, headers={"Authorization": ""}).status_code == 200
    assert guarded.get(query, headers={"Authorization": "Bearer"}).status_code == 401
