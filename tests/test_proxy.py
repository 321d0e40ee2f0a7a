"""deploy/nginx in front of a real gunicorn aggregator on 127.0.0.1: requests pass through,
the proxy's own refusals are JSON, idle and slow connections do not stop pulls, the
aggregator down is a 502 the workers retry, and TLS with scripts/make-certs.sh.

nginx (Debian's `nginx` package) runs as this test's user from a temporary prefix,
configured by the image's own entrypoint.sh. Without nginx or openssl the tests that
need them skip with the reason; with CI=true they fail instead.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from fedsim.client.transport import RetryPolicy, Transport
from helpers import (
    WORKERS_TOKEN,
    Server,
    Trickle,
    running_aggregator,
    start_gunicorn,
    start_nginx,
    upload,
    wait_healthy,
    wait_until,
)
from helpers.servers import NGINX_ENTRYPOINT

ROOT = Path(__file__).resolve().parent.parent
MAKE_CERTS = ROOT / "scripts" / "make-certs.sh"
IN_CI = os.environ.get("CI", "").lower() == "true"
LIMIT = 900_000  # MAX_UPDATE_BYTES for the aggregator and the proxy; an mlp update fits
AUTH = {"Authorization": f"Bearer {WORKERS_TOKEN}"}
# A pull normally takes milliseconds; a gunicorn whose threads are all held never answers.
# The bound is generous so a busy machine does not fail the test.
PULL_TIMEOUT = 5.0


def need(name: str, package: str) -> str:
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None
    )
    if path is None:
        reason = f"{name} not found: apt-get install -y {package} (Debian's package)"
        if IN_CI:
            pytest.fail(reason + "; CI=true requires it")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def nginx() -> str:
    return need("nginx", "nginx")


@pytest.fixture(scope="module")
def openssl() -> str:
    return need("openssl", "openssl")


def start_proxy(tmp_path: Path, upstream: str, *, tls: bool = False) -> Server:
    """nginx with the aggregator's MAX_UPDATE_BYTES in front of `upstream` (a URL)."""
    return start_nginx(tmp_path, upstream, tls=tls, MAX_UPDATE_BYTES=LIMIT)


@pytest.fixture
def aggregator(tmp_path: Path) -> Iterator[Server]:
    with running_aggregator(
        tmp_path, SAVE_MODEL=100, IDLE_SAVE_SECONDS=3600, MAX_UPDATE_BYTES=LIMIT
    ) as srv:
        yield srv


@pytest.fixture
def proxy(nginx: str, aggregator: Server, tmp_path: Path) -> Iterator[Server]:
    started = start_proxy(tmp_path, aggregator.url)
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def certs(openssl: str, tmp_path: Path) -> Path:
    done = subprocess.run(
        [str(MAKE_CERTS), str(tmp_path / "certs")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return tmp_path / "certs"


def version(url: str, **kwargs: object) -> int:
    return requests.get(url + "/v1/status", timeout=10, **kwargs).json()["version"]


# --- through the proxy --------------------------------------------------------------------


def test_requests_pass_through(aggregator: Server, proxy: Server) -> None:
    health = requests.get(proxy.url + "/healthz", timeout=10)
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "version": 0}

    direct = requests.get(aggregator.url + "/v1/model", timeout=10)
    model = requests.get(proxy.url + "/v1/model", timeout=10)
    assert model.status_code == 200
    assert model.content == direct.content
    assert model.headers["ETag"] == direct.headers["ETag"]
    assert model.raw.version == 11  # HTTP/1.1
    same = requests.get(
        proxy.url + "/v1/model", headers={"If-None-Match": model.headers["ETag"]}, timeout=10
    )
    assert same.status_code == 304
    assert same.content == b""

    body = upload(1.0, update_id="through-proxy")
    session = requests.Session()
    session.headers.update(AUTH)
    pushed = session.post(proxy.url + "/v1/updates", data=body, timeout=10)
    assert pushed.status_code == 200, pushed.text
    assert pushed.json()["version"] == 1
    again = session.post(proxy.url + "/v1/updates", data=body, timeout=10)
    assert again.json()["duplicate"] is True

    # A chunked body is read whole by nginx and reaches gunicorn with a Content-Length.
    chunked_body = upload(2.0, update_id="chunked")
    chunks = (chunked_body[i : i + 65536] for i in range(0, len(chunked_body), 65536))
    chunked = session.post(proxy.url + "/v1/updates", data=chunks, timeout=10)
    assert chunked.status_code == 200, chunked.text
    assert chunked.json()["version"] == 2

    # The aggregator's own refusals pass through untouched.
    anonymous = requests.post(proxy.url + "/v1/updates", data=upload(3.0), timeout=10)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"] == "unauthorized"
    assert version(aggregator.url) == 2


def test_a_body_over_the_limit_is_refused_by_the_proxy_as_json(
    aggregator: Server, proxy: Server
) -> None:
    before = requests.get(aggregator.url + "/v1/model", timeout=10).content
    url = proxy.url + "/v1/updates"

    declared = requests.post(url, data=b"\0" * (LIMIT + 1), headers=AUTH, timeout=10)
    assert declared.status_code == 413
    assert declared.headers["Content-Type"] == "application/json"
    assert declared.json() == {
        "error": "too_large",
        "detail": f"body is over MAX_UPDATE_BYTES={LIMIT} (refused by the proxy)",
    }

    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b"\0" * 50_000

    chunked = requests.post(url, data=chunks(), headers=AUTH, timeout=10)
    assert chunked.status_code == 413
    assert chunked.json()["error"] == "too_large"

    # Bad chunking is the proxy's 400, also JSON.
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/updates HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
        )
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b'{"error":"bad_request"' in answer

    # None of them reached the aggregator.
    assert requests.get(aggregator.url + "/v1/model", timeout=10).content == before
    assert "refused update" not in aggregator.output()


def test_idle_and_slow_connections_do_not_stop_pulls(aggregator: Server, proxy: Server) -> None:
    expected = requests.get(aggregator.url + "/v1/model", timeout=10).content
    hostile = Trickle(proxy.port, idle=50, slow=20)
    try:
        hostile.wait_trickling()  # every slow socket has sent its first bytes
        for _ in range(10):  # each on a fresh connection, as a new worker would
            pulled = requests.get(proxy.url + "/v1/model", timeout=PULL_TIMEOUT)
            assert pulled.status_code == 200
            assert pulled.content == expected
        # The 70 sockets were held open by the proxy all along, not refused.
        assert hostile.still_open() == 70
    finally:
        hostile.close()


def test_without_the_proxy_the_same_slow_connections_stop_gunicorn(aggregator: Server) -> None:
    """The control for the test above: its slow sockets do hold every gunicorn thread."""
    hostile = Trickle(aggregator.port, idle=0, slow=20)
    try:
        hostile.wait_trickling()
        with pytest.raises(requests.Timeout):
            requests.get(aggregator.url + "/v1/model", timeout=PULL_TIMEOUT)
    finally:
        hostile.close()
    wait_healthy(aggregator)  # and it comes back once they are gone


def test_the_aggregator_down_is_a_json_502_that_workers_retry(
    aggregator: Server, proxy: Server, tmp_path: Path
) -> None:
    aggregator.stop()

    down = requests.get(proxy.url + "/healthz", timeout=10)
    assert down.status_code == 502
    assert down.headers["Retry-After"] == "2"
    assert down.json()["error"] == "unavailable"
    pushed = requests.post(proxy.url + "/v1/updates", data=upload(1.0), headers=AUTH, timeout=10)
    assert pushed.status_code == 502
    assert pushed.json()["error"] == "unavailable"

    transport = Transport(proxy.url, policy=RetryPolicy(2, 0.0, sleep=lambda s: None), timeout=10)
    pulled = transport.pull()
    assert (pulled.ok, pulled.error, pulled.retries) == (False, "HTTP 502", 1)

    # Back on the same port: the proxy passes requests again by itself.
    again = start_gunicorn(tmp_path, aggregator.port, SAVE_MODEL=100, MAX_UPDATE_BYTES=LIMIT)
    try:
        wait_until(
            lambda: (
                again.running()
                and requests.get(proxy.url + "/healthz", timeout=10).status_code == 200
            ),
            60,
            lambda: f"the proxy never reached the restarted aggregator:\n{proxy.output()}",
            poll=0.1,
        )
        assert transport.pull().ok
    finally:
        again.stop()


# --- TLS ------------------------------------------------------------------------------------


def test_tls_with_the_local_ca(nginx: str, aggregator: Server, certs: Path, tmp_path: Path) -> None:
    proxy = start_proxy(tmp_path, aggregator.url, tls=True)
    ca = str(certs / "ca.pem")
    try:
        for host in ("127.0.0.1", "localhost"):  # both are in the certificate
            health = requests.get(f"https://{host}:{proxy.port}/healthz", verify=ca, timeout=10)
            assert health.status_code == 200
            assert health.raw.version == 11

        # verify= on the request: a Session's own `verify` loses to REQUESTS_CA_BUNDLE or
        # CURL_CA_BUNDLE in the environment (psf/requests#3829).
        pushed = requests.post(
            proxy.url + "/v1/updates", data=upload(1.0), headers=AUTH, verify=ca, timeout=10
        )
        assert pushed.status_code == 200, pushed.text

        # Without the CA the certificate is not trusted.
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(proxy.url + "/healthz", timeout=10)

        # Plain HTTP to the TLS port gets a JSON answer that says what to do.
        plain = requests.get(f"http://127.0.0.1:{proxy.port}/healthz", timeout=10)
        assert plain.status_code == 400
        assert "https://" in plain.json()["detail"]

        # TLS 1.2 is offered only with forward-secret AEAD ciphers; 1.3 is preferred.
        context = ssl.create_default_context(cafile=ca)
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        with (
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            name, protocol, _ = tls.cipher()
            assert protocol == "TLSv1.2"
            assert name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name)
        context = ssl.create_default_context(cafile=ca)
        with (
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.version() == "TLSv1.3"
    finally:
        proxy.stop()


def test_make_certs_is_idempotent(openssl: str, certs: Path) -> None:
    files = ("ca.pem", "ca-key.pem", "server.pem", "server-key.pem")
    first = {name: (certs / name).read_bytes() for name in files}
    assert (certs / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    assert (certs / "server-key.pem").stat().st_mode & 0o777 == 0o600

    names = subprocess.run(
        [openssl, "x509", "-in", str(certs / "server.pem"), "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in ("DNS:proxy", "DNS:aggregator", "DNS:localhost", "IP Address:127.0.0.1"):
        assert name in names
    verified = subprocess.run(
        [openssl, "verify", "-CAfile", str(certs / "ca.pem"), str(certs / "server.pem")],
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr

    again = subprocess.run(
        [str(MAKE_CERTS), str(certs)], capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0, again.stderr
    assert "CA: kept" in again.stdout and "server: kept" in again.stdout
    assert {name: (certs / name).read_bytes() for name in files} == first

    # A name the certificate lacks: a new server certificate from the same CA.
    more = subprocess.run(
        [str(MAKE_CERTS), "--name", "fedsim.example", str(certs)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert more.returncode == 0, more.stderr
    assert "server: made" in more.stdout and "does not name fedsim.example" in more.stdout
    assert (certs / "ca.pem").read_bytes() == first["ca.pem"]
    assert (certs / "server.pem").read_bytes() != first["server.pem"]


# --- the entry point's refusals ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TLS": "maybe"}, "invalid setting TLS='maybe': true or false"),
        ({"MAX_UPDATE_BYTES": "16M"}, "invalid setting MAX_UPDATE_BYTES='16M': an integer >= 1024"),
        (
            {"MAX_UPDATE_BYTES": "1000"},
            "invalid setting MAX_UPDATE_BYTES='1000': an integer >= 1024",
        ),
        ({"UPSTREAM": "aggregator"}, "invalid setting UPSTREAM='aggregator': host:port"),
        ({"LISTEN_PORT": "70000"}, "invalid setting LISTEN_PORT='70000'"),
        ({"TLS": "true"}, "server.pem is missing or unreadable: run scripts/make-certs.sh"),
    ],
)
def test_the_entrypoint_refuses_bad_settings_in_one_line(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    environ = {
        "PATH": os.environ.get("PATH", ""),
        "NGINX_PREFIX": str(tmp_path / "nginx"),
        "CERT_DIR": str(tmp_path / "no-certs"),
        **env,
    }
    done = subprocess.run(
        [str(NGINX_ENTRYPOINT)], env=environ, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert done.stderr.startswith("fedsim proxy: error: ")
    assert message in done.stderr
    assert done.stderr.count("\n") == 1
