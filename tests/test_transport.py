"""The client's HTTP transport: which failures are retried, how often, and with what body."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import requests
from requests.adapters import BaseAdapter

from fedsim import weights
from fedsim.client.transport import ProtocolError, RetryPolicy, Transport
from fedsim.protocol import EvalTask, Evaluation, UpdateMeta

TENSORS = {"layer/kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}
META = UpdateMeta(client_id="client-1", update_id="u-1", base_version=3, num_samples=10)


class Scripted(BaseAdapter):
    """Answers requests from a script: an int status (with an optional body and headers) or
    an exception."""

    def __init__(self, script: list) -> None:
        super().__init__()
        self.script = list(script)
        self.requests: list[requests.PreparedRequest] = []

    def send(self, request, **kwargs):
        self.requests.append(request)
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        status, body, *headers = step if isinstance(step, tuple) else (step, b"{}")
        response = requests.Response()
        response.status_code = status
        response.headers.update(*headers)
        response._content = body
        response._content_consumed = True  # the whole body is here, as after a real read
        response.request = request
        response.url = request.url
        return response

    def close(self) -> None:
        pass


class FakeSleep:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def transport(script: list, *, attempts: int = 3, max_wait: float = 2.0):
    adapter = Scripted(script)
    session = requests.Session()
    session.mount("http://", adapter)
    sleep = FakeSleep()
    # The random wait is the policy's upper bound here, so the test sees it.
    policy = RetryPolicy(attempts, max_wait, sleep=sleep, uniform=lambda lo, hi: hi)
    return Transport("http://agg:8080", policy=policy, timeout=5, session=session), adapter, sleep


def test_push_retries_a_lost_connection_with_the_same_body():
    # Prepare: the first try never connects, the second is accepted.
    link, adapter, sleep = transport(
        [requests.ConnectionError("refused"), (200, b'{"accepted":true,"version":5}')]
    )
    # Execute
    pushed = link.push(TENSORS, META)
    # Assert
    assert pushed.accepted and pushed.version == 5 and pushed.retries == 1
    assert sleep.calls == [2.0]
    bodies = [r.body for r in adapter.requests]
    assert len(bodies) == 2 and bodies[0] == bodies[1]
    assert all(weights.decode(b)[1]["update_id"] == "u-1" for b in bodies)
    assert all(
        r.method == "POST" and r.url == "http://agg:8080/v1/updates" for r in adapter.requests
    )


def test_push_gives_up_after_max_retry_tries():
    link, adapter, sleep = transport([503, requests.Timeout("slow"), 502], attempts=3)
    pushed = link.push(TENSORS, META)
    assert not pushed.accepted and pushed.status is None
    assert pushed.retries == 2 and "502" in pushed.detail
    assert len(adapter.requests) == 3 and len(sleep.calls) == 2


@pytest.mark.parametrize(
    ("status", "retry_after", "waited", "said"),
    [
        (429, "30", 30.0, "next try in 30.0s (Retry-After: 30)"),
        (503, "5", 5.0, "next try in 5.0s (Retry-After: 5)"),
        (504, "7", 7.0, "next try in 7.0s (Retry-After: 7)"),
        (429, " 0 ", 0.0, "next try in 0.0s (Retry-After: 0)"),
        (429, "3600", 300.0, "next try in 300.0s (Retry-After: 3600, capped at 300s)"),
    ],
    ids=["quota", "unavailable", "proxy-timeout", "at-once", "capped"],
)
def test_a_retry_after_in_seconds_is_waited_for(caplog, status, retry_after, waited, said):
    # Prepare: the aggregator says when to come back, then accepts.
    link, adapter, sleep = transport(
        [(status, b"{}", {"Retry-After": retry_after}), (200, b'{"accepted":true,"version":5}')]
    )
    # Act
    with caplog.at_level(logging.INFO, logger="fedsim.client.transport"):
        pushed = link.push(TENSORS, META)
    # Assert: the wait is the one asked for (within the cap), and the log line says so.
    assert pushed.accepted and pushed.retries == 1 and len(adapter.requests) == 2
    assert sleep.calls == [waited]
    assert f"POST /v1/updates try 1/3 failed: HTTP {status}; {said}" in caplog.text


@pytest.mark.parametrize(
    ("status", "retry_after", "said"),
    [
        (429, "soon", "Retry-After 'soon' is not whole seconds"),
        (503, "Wed, 21 Oct 2026 07:28:00 GMT", "is not whole seconds"),
        (429, "-5", "Retry-After '-5' is not whole seconds"),
        (429, "2.5", "Retry-After '2.5' is not whole seconds"),
        (502, "", "(random, MAX_WAIT=2)"),
    ],
    ids=["word", "http-date", "negative", "fraction", "none"],
)
def test_a_retry_after_that_is_not_seconds_leaves_the_random_wait(
    caplog, status, retry_after, said
):
    link, _, sleep = transport([(status, b"{}", {"Retry-After": retry_after}), 503], attempts=2)
    with caplog.at_level(logging.DEBUG, logger="fedsim.client.transport"):
        pulled = link.pull()
    assert not pulled.ok and pulled.error == "HTTP 503"
    assert sleep.calls[0] == 2.0  # the random wait (its upper bound here)
    assert said in caplog.text


def test_after_the_last_try_nothing_is_waited_for():
    link, adapter, sleep = transport([(429, b"{}", {"Retry-After": "60"})] * 2, attempts=2)
    pushed = link.push(TENSORS, META)
    assert not pushed.accepted and pushed.detail == "HTTP 429"
    assert len(adapter.requests) == 2 and sleep.calls == [60.0]


@pytest.mark.parametrize("status", [400, 413, 422])
def test_a_refused_body_is_a_bug_and_not_retried(status: int):
    link, adapter, sleep = transport([(status, b'{"error":"bad","detail":"wrong shape"}')])
    with pytest.raises(ProtocolError, match=f"HTTP {status}.*wrong shape"):
        link.push(TENSORS, META)
    assert len(adapter.requests) == 1 and sleep.calls == []


def test_409_is_an_answer_not_a_failure():
    body = b'{"error":"stale","detail":"base 3 is not 4","version":4,"finished":false}'
    link, adapter, _ = transport([(409, body)])
    pushed = link.push(TENSORS, META)
    assert (pushed.accepted, pushed.status, pushed.version, pushed.finished) == (
        False,
        409,
        4,
        False,
    )
    assert "base 3" in pushed.detail and len(adapter.requests) == 1


def test_pull_decodes_the_model_and_its_version():
    body = weights.encode(TENSORS, {"version": 7, "samples": 100, "model": "mlp"})
    link, _, _ = transport([503, (200, body)])
    pulled = link.pull()
    assert pulled.ok and pulled.version == 7 and pulled.retries == 1
    np.testing.assert_array_equal(pulled.tensors["layer/kernel"], TENSORS["layer/kernel"])


def test_pull_that_always_fails_reports_it():
    link, adapter, sleep = transport([requests.ConnectionError("down")] * 2, attempts=2)
    pulled = link.pull()
    assert not pulled.ok and pulled.version is None and "down" in pulled.error
    assert len(adapter.requests) == 2 and len(sleep.calls) == 1


def test_push_returns_the_sequence_number():
    link, _, _ = transport([(200, b'{"accepted":true,"version":5,"duplicate":false,"seq":9}')])
    assert link.push(TENSORS, META).seq == 9


def test_lookup_states_and_the_url_it_asks():
    saved = b'{"update_id":"a/b c","state":"saved","version":4,"seq":9}'
    lost = b'{"error":"unknown_update","detail":"not known","forgotten":false}'
    old = b'{"error":"unknown_update","detail":"saved long ago","forgotten":true}'
    link, adapter, _ = transport([(200, saved), (404, lost), (404, old)])
    first = link.lookup("a/b c", 9)
    assert (first.state, first.version, first.seq, first.ok) == ("saved", 4, 9, True)
    assert adapter.requests[0].url == "http://agg:8080/v1/updates/a%2Fb%20c?seq=9"
    second = link.lookup("u-1")
    assert (second.state, second.forgotten) == ("unknown", False)
    assert adapter.requests[1].url == "http://agg:8080/v1/updates/u-1"
    assert link.lookup("u-1", 1).forgotten is True


def test_lookup_retries_then_reports_no_answer():
    link, adapter, sleep = transport([requests.ConnectionError("down"), 503], attempts=2)
    looked = link.lookup("u-1", 3)
    assert not looked.ok and looked.retries == 1 and "503" in looked.error
    assert len(adapter.requests) == 2 and len(sleep.calls) == 1


def test_lookup_of_a_route_that_is_not_there_is_a_bug():
    link, _, _ = transport([(404, b'{"error":"not_found","detail":"no such route"}')])
    with pytest.raises(ProtocolError, match="HTTP 404"):
        link.lookup("u-1")


@pytest.mark.parametrize("body", [b"<html>not the aggregator</html>", b"[1, 2]"])
def test_a_200_without_a_json_object_names_the_setting(body: bytes):
    for call in ("health", "status", "push"):
        link, _, _ = transport([(200, body)])
        args = (TENSORS, META) if call == "push" else ()
        with pytest.raises(ProtocolError, match=r"HTTP 200 without a JSON object.*AGGREGATOR_URL"):
            getattr(link, call)(*args)


def test_a_task_is_read_into_its_record():
    task = {"id": "eval.v2", "lease": "ab", "kind": "evaluate", "version": 2}
    body = json.dumps({"task": task, "worker": "w4", "retry_after": 1.5}).encode()
    link, adapter, _ = transport([(200, body)])
    offer = link.ask("host-1-ab", retries=3)
    assert offer.reachable and offer.task == EvalTask("eval.v2", "ab", 2)
    assert (offer.worker, offer.retry_after) == ("w4", 1.5)
    assert json.loads(adapter.requests[0].body) == {"worker": "host-1-ab", "retries": 3}


def test_a_task_that_breaks_the_protocol_stops_the_worker():
    body = b'{"task": {"id": "x", "lease": "ab", "kind": "dance"}}'
    link, _, _ = transport([(200, body)])
    with pytest.raises(ProtocolError, match="cannot do: a task of unknown kind 'dance'"):
        link.ask("host-1-ab")


def test_an_evaluation_is_reported_as_its_json():
    link, adapter, _ = transport([(409, b'{"error":"task_done","detail":"scored"}')])
    status, answer, retries = link.report(Evaluation("w", "eval.v1", "ab", 0.5, 1.0))
    assert (status, answer["error"], retries) == (409, "task_done", 0)
    sent = json.loads(adapter.requests[0].body)
    assert sent == {"worker": "w", "task": "eval.v1", "lease": "ab", "accuracy": 0.5, "loss": 1.0}


def test_health_tries_once():
    link, adapter, sleep = transport([requests.ConnectionError("down")])
    assert link.health() is None
    assert len(adapter.requests) == 1 and sleep.calls == []


@pytest.fixture
def flaky_server() -> Iterator[tuple[str, list[bytes]]]:
    """A real HTTP server on 127.0.0.1 that answers 503 once, then accepts."""
    received: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            status, body = (
                (503, b"{}") if len(received) == 1 else (200, b'{"accepted":true,"version":1}')
            )
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", received
    server.shutdown()
    server.server_close()
    thread.join()


def test_retry_over_a_real_socket(flaky_server):
    url, received = flaky_server
    sleep = FakeSleep()
    policy = RetryPolicy(2, 1.0, sleep=sleep, uniform=lambda lo, hi: 0.5)
    link = Transport(url, policy=policy, timeout=5)
    try:
        pushed = link.push(TENSORS, META)
    finally:
        link.close()
    assert pushed.accepted and pushed.retries == 1 and sleep.calls == [0.5]
    assert len(received) == 2 and received[0] == received[1]


def test_a_refused_connection_is_described_briefly():
    link = Transport(
        "http://127.0.0.1:9",  # the discard port: nothing listens
        policy=RetryPolicy(1, 0.0, sleep=FakeSleep()),
        timeout=5,
    )
    try:
        pulled = link.pull()
    finally:
        link.close()
    assert not pulled.ok and pulled.error == "connection refused"


class Oversized(BaseHTTPRequestHandler):
    """Answers 200 with a body larger than the transport takes (declared or chunked)."""

    def do_GET(self) -> None:
        self.send_response(200)
        if self.path.endswith("declared"):
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b"x" * 65536
        try:
            for _ in range(40):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the reader gave up, as it should

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("how", ["declared", "chunked"])
def test_an_answer_over_the_cap_is_refused_before_it_fills_memory(monkeypatch, how) -> None:
    import fedsim.client.transport as module

    monkeypatch.setattr(module, "MAX_RESPONSE_BYTES", 1 << 20)  # 1 MiB for the test
    server = ThreadingHTTPServer(("127.0.0.1", 0), Oversized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        policy = RetryPolicy(1, 0.0)
        link = Transport(f"http://127.0.0.1:{server.server_port}", policy=policy, timeout=5)
        with pytest.raises(ProtocolError, match="over 1048576"):
            link._call("GET", "/" + how)
        link.close()
    finally:
        server.shutdown()
        server.server_close()
