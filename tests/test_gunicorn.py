"""The aggregator under a real gunicorn on 127.0.0.1, with real HTTP and real signals."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from fedsim import checkpoints
from helpers import WORKERS_TOKEN, Server, running_aggregator, start_gunicorn, upload


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with running_aggregator(
        tmp_path, SAVE_MODEL=100, IDLE_SAVE_SECONDS=3600, MAX_UPDATE_BYTES=900_000
    ) as srv:
        yield srv


def model_state(server: Server) -> tuple[bytes, int, int]:
    body = requests.get(server.url + "/v1/model", timeout=10).content
    status = requests.get(server.url + "/v1/status", timeout=10).json()
    return body, status["version"], status["samples"]


def test_real_bad_requests_change_nothing(server: Server) -> None:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {WORKERS_TOKEN}"
    url = server.url + "/v1/updates"
    assert session.post(url, data=upload(1.0, update_id="ok"), timeout=10).status_code == 200
    before = model_state(server)

    garbage = session.post(url, data=b"\x00" * 100, timeout=10)
    assert garbage.status_code == 400
    assert garbage.json()["error"] == "unreadable"

    wrong = session.post(url, data=upload(1.0, update_id="x", num_samples=0), timeout=10)
    assert wrong.status_code == 422
    assert wrong.json()["error"] == "bad_num_samples"

    # Over MAX_UPDATE_BYTES=900000 by its Content-Length: refused before the body is read.
    big = session.post(url, data=b"\x00" * 1_000_000, timeout=10)
    assert big.status_code == 413
    assert big.json()["error"] == "too_large"

    # Chunked, so no Content-Length: the read is capped.
    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b"\x00" * 50_000

    headers = {"Authorization": f"Bearer {WORKERS_TOKEN}"}
    try:
        chunked = requests.post(url, data=chunks(), headers=headers, timeout=10)
    except requests.ConnectionError:
        pass  # the server answered 413 and closed while the sender was still sending
    else:
        assert chunked.status_code == 413

    assert model_state(server) == before
    # The connection still works after the refusals, and the refused id was not remembered.
    accepted = session.post(url, data=upload(2.0, update_id="x"), timeout=10).json()
    assert accepted == {"accepted": True, "version": 2, "duplicate": False, "seq": 2}
    assert "refused update" in server.output()


def raw_request(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `data` as it is on a new connection; the status, headers and body answered. The
    server closes the connection after a framing error, which ends the read."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body[: int(headers["content-length"])]


def _framings() -> list[tuple[str, bytes, bytes, str]]:
    """(name, framing headers, body, error code) of uploads whose framing is broken."""
    data = upload(7.0, update_id="framed")
    chunked = b"Transfer-Encoding: chunked\r\n"
    return [
        ("size zz", chunked, b"zz\r\n" + data[:16] + b"\r\n0\r\n\r\n", "bad_framing"),
        ("size -1", chunked, b"-1\r\n" + data[:16] + b"\r\n0\r\n\r\n", "bad_framing"),
        ("size 0x10", chunked, b"0x10\r\n" + data[:16] + b"\r\n0\r\n\r\n", "bad_framing"),
        ("leading space", chunked, b" 10\r\n" + data[:16] + b"\r\n0\r\n\r\n", "bad_framing"),
        ("no CRLF after data", chunked, b"10\r\n" + data[:16] + b"0\r\n\r\n", "bad_framing"),
        ("longer than its size", chunked, b"10\r\n" + data[:40] + b"\r\n0\r\n\r\n", "bad_framing"),
        ("length zz", b"Content-Length: zz\r\n", data, "bad_request"),
        ("length -1", b"Content-Length: -1\r\n", data, "bad_request"),
        ("length 0x10", b"Content-Length: 0x10\r\n", data[:16], "bad_request"),
        ("length +16", b"Content-Length: +16\r\n", data[:16], "bad_request"),
        ("both", b"Content-Length: 16\r\n" + chunked, b"10\r\n" + data[:16], "bad_request"),
    ]  # fmt: skip


def test_every_broken_framing_is_a_json_400_and_changes_nothing(server: Server) -> None:
    head = (
        "POST /v1/updates HTTP/1.1\r\nHost: aggregator\r\n"
        f"Authorization: Bearer {WORKERS_TOKEN}\r\nContent-Type: application/octet-stream\r\n"
    ).encode()
    before = model_state(server)
    for name, framing, body, code in _framings():
        status, headers, answer = raw_request(server.port, head + framing + b"\r\n" + body)
        assert status == 400, (name, answer)
        assert headers["content-type"] == "application/json", name
        refusal = json.loads(answer)
        assert refusal["error"] == code and refusal["detail"], (name, refusal)
    assert model_state(server) == before
    assert "Traceback" not in server.output() and "Error handling request" not in server.output()
    # The refused id was not remembered: the same update, framed right, is new.
    good = requests.post(
        server.url + "/v1/updates",
        data=upload(7.0, update_id="framed"),
        headers={"Authorization": f"Bearer {WORKERS_TOKEN}"},
        timeout=10,
    )
    assert good.json()["duplicate"] is False


def test_a_body_cut_short_of_its_content_length_is_a_json_400(server: Server) -> None:
    data = upload(3.0, update_id="cut")
    head = (
        "POST /v1/updates HTTP/1.1\r\nHost: aggregator\r\n"
        f"Authorization: Bearer {WORKERS_TOKEN}\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode()
    before = model_state(server)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + data[: len(data) // 2])
        sock.shutdown(socket.SHUT_WR)  # the sender stops half way
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    status_line, _, rest = received.partition(b"\r\n")
    assert status_line.split()[1] == b"400", received[:300]
    refusal = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert refusal["error"] == "unreadable" and "the body holds" in refusal["detail"], refusal
    assert model_state(server) == before


def test_model_etag_and_304_over_http(server: Server) -> None:
    first = requests.get(server.url + "/v1/model", timeout=10)
    assert first.headers["ETag"].startswith('"0-')
    assert first.headers["Content-Type"] == "application/octet-stream"
    again = requests.get(
        server.url + "/v1/model", headers={"If-None-Match": first.headers["ETag"]}, timeout=10
    )
    assert again.status_code == 304


def test_sigterm_leaves_a_final_checkpoint_with_unsaved_updates(server: Server) -> None:
    for i in range(3):
        body = upload(float(i), update_id=f"u{i}", num_samples=10)
        headers = {"Authorization": f"Bearer {WORKERS_TOKEN}"}
        assert requests.post(server.url + "/v1/updates", data=body, headers=headers, timeout=10).ok
    assert checkpoints.versions(server.model_dir) == [0]  # SAVE_MODEL=100: nothing saved yet
    assert server.stop() == 0
    ckpt = checkpoints.load_newest(server.model_dir)
    assert ckpt is not None
    assert ckpt.version == 3
    assert ckpt.metadata["samples"] == "30"
    assert json.loads(ckpt.metadata["applied_ids"]) == ["u0", "u1", "u2"]
    assert "checkpoint v3 written" in server.output() and "shutdown" in server.output()


def test_gunicorn_exits_nonzero_with_the_message_when_there_is_no_checkpoint(
    tmp_path: Path,
) -> None:
    srv = start_gunicorn(tmp_path)
    try:
        code = srv.proc.wait(timeout=60)
    finally:
        srv.stop()
    assert code != 0
    output = srv.output()
    assert f"no checkpoint in {srv.model_dir}" in output
    assert "python -m fedsim.prepare" in output
    assert output.count("Booting worker") == 1  # it stopped; it did not respawn the worker


def test_a_bad_threads_value_stops_gunicorn_with_one_line_naming_it(tmp_path: Path) -> None:
    srv = start_gunicorn(tmp_path, THREADS="eight")
    try:
        code = srv.proc.wait(timeout=60)
    finally:
        srv.stop()
    assert code != 0
    assert "invalid setting THREADS='eight': an integer >= 1" in srv.output()
    assert "Traceback" not in srv.output()


def test_gunicorn_says_which_allocator_it_runs_under(server: Server) -> None:
    assert "memory allocator: glibc malloc" in server.output()  # nothing preloaded here
