"""The HTTP plumbing every endpoint shares: the token check (401, 403), the bodies read
whole or refused (400 broken framing or JSON, 413 too large), and the JSON errors.

Every refusal is JSON `{"error": <code>, "detail": <sentence>}` with a 4xx status.
"""

from __future__ import annotations

from typing import Any

from flask import Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from fedsim.aggregator.state import State
from fedsim.protocol import Invalid

MAX_JSON_BYTES = 4096  # task requests and evaluation reports are a few hundred bytes

# --- tokens -----------------------------------------------------------------------------

OPEN_PATHS = frozenset({"/healthz"})  # probes never need a token


def authenticate() -> Response | None:
    """401 without a token, 403 with an unknown one, for every request that changes
    state (and every read too under AUTH_READS). The token found is `g.token`.

    A request that changes state carries its token in the Authorization header only:
    a query string ends up in proxy and access logs. `?access_token=` (RFC 6750) is
    taken for reads alone (the dashboard under AUTH_READS), and never beside a header.
    """
    g.token = None
    reading = request.method in ("GET", "HEAD")
    if request.path in OPEN_PATHS or (reading and not state().settings.auth_reads):
        return None
    if reading and request.path.startswith("/static/"):
        return None  # the page's own scripts and styles hold nothing of the run
    header = request.headers.get("Authorization", "").strip()
    if header:
        scheme, _, presented = header.partition(" ")
        presented = presented.strip() if scheme.lower() == "bearer" else ""
    elif reading:
        presented = request.args.get("access_token", "")
    else:
        presented = ""
    if not presented:
        where = "" if reading or "access_token" not in request.args else " (not ?access_token=)"
        return error(
            401,
            "unauthorized",
            "this request needs a token: send `Authorization: Bearer <token>`"
            f"{where} (see TOKENS_FILE)",
        )
    token = current_app.extensions["fedsim_tokens"].find(presented)
    if token is None:
        return error(403, "forbidden", "the token is not one of this aggregator's")
    g.token = token
    return None


def workers_only() -> Response | None:
    """Tasks name any logical client: only a token for all clients ("*") may take them."""
    token = g.get("token")
    if token is None or not token.for_workers:
        name = token.name if token is not None else "none"
        return error(403, "forbidden", f'token {name!r} is not a workers\' token ("*")')
    return None


def state() -> State:
    return current_app.extensions["fedsim"]


def error(status: int, code: str, detail: str, **extra: Any) -> Response:
    response = jsonify(error=code, detail=detail, **extra)
    response.status_code = status
    return response


def refusal(source: str, status: int, code: str, detail: str, *, tell_version: bool) -> Response:
    """The answer to a refused request, noted in the run's events under `source`. With
    `tell_version` it carries the served version and whether the run is finished, so that
    a worker holding work the run has moved past lets it go."""
    current = state()
    current.note_refusal(source, code, detail)
    if tell_version:
        version, finished = current.info()
        return error(status, code, detail, version=version, finished=finished)
    return error(status, code, detail)


def http_error(exc: HTTPException) -> Response:
    """Werkzeug's errors (404, 405, 413 from the read cap...) as JSON like ours."""
    code = "too_large" if exc.code == 413 else (exc.name or "error").lower().replace(" ", "_")
    return error(exc.code or 500, code, exc.description or exc.name)


def read_body() -> bytes:
    """The request's body, or Invalid (400) when its framing is broken.

    The server reads the body as the app asks for it: a chunked body with a bad chunk
    size ("zz", "-1", "0x10", " 5"), data not ended by CRLF or longer than its size,
    or a cut trailer raises from gunicorn's reader here (the connection is closed
    after the answer). Werkzeug's own refusals (413 over the cap, 400 a body cut
    short) are HTTP errors and pass on to `_http_error`.
    """
    try:
        length, cap = request.content_length, current_app.config["MAX_CONTENT_LENGTH"]
        if length is None or (cap is not None and length > cap):  # chunked, or over: 413
            return request.get_data(cache=False)
        # Asked for whole, gunicorn reads the body in a few large recv()s into one buffer;
        # read 64 kB at a time (as get_data does), it re-copied what it had buffered on
        # every read: a third of an mlp upload's CPU. The server's own stream, not
        # Werkzeug's wrapper, which copies it twice more: its Content-Length is within
        # the cap and gunicorn never reads past it.
        stream = request.environ["wsgi.input"]
        parts, missing = [], length
        while missing > 0:
            part = stream.read(missing)
            if not part:
                break
            parts.append(part)
            missing -= len(part)
        return b"".join(parts)
    except HTTPException:
        raise
    except Exception as exc:  # the server's body reader; nothing of the body was used
        raise Invalid("bad_framing", f"the request body's framing is broken: {exc}"[:200]) from None


def json_body() -> dict[str, Any]:
    """A small JSON object body, or Invalid (413 too large, 400 not a JSON object)."""
    if request.content_length is not None and request.content_length > MAX_JSON_BYTES:
        raise Invalid("too_large", f"body is over {MAX_JSON_BYTES} bytes", 413)
    raw = read_body()
    if len(raw) > MAX_JSON_BYTES:
        raise Invalid("too_large", f"body is over {MAX_JSON_BYTES} bytes", 413)
    try:
        body = request.json_module.loads(raw or b"{}")
    except (ValueError, RecursionError):
        raise Invalid("bad_json", "body is not JSON") from None
    if not isinstance(body, dict):
        raise Invalid("bad_json", "body is not a JSON object")
    return body


def bad(exc: Invalid) -> Response:
    return error(exc.status, exc.code, exc.detail)
