"""The aggregator's HTTP API (see the README's API table).

Every refusal is JSON `{"error": <code>, "detail": <sentence>}` with a 4xx
status, and changes nothing that is served or saved.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import PathConverter

from fedsim.aggregator import history, intake, uploads, views
from fedsim.aggregator.state import State
from fedsim.aggregator.strategies import Refused
from fedsim.protocol import Ask, Dropout, Evaluation, Invalid, digits, valid_id, worker_id

log = logging.getLogger("fedsim.aggregator")

bp = Blueprint("api", __name__)

MAX_JSON_BYTES = 4096  # task requests and evaluation reports are a few hundred bytes
MAX_WAIT_HINT = 2.0  # longest retry_after the aggregator suggests to an idle worker
HELD_WAIT_HINT = 0.01  # after an ask held for a change: ask again at once


class AnyTextConverter(PathConverter):
    """Like `path`, but also matches control characters, so a bad id gets our 400."""

    regex = "[^/][\\s\\S]*?"


def init_app(app: Flask) -> None:
    app.url_map.converters["text"] = AnyTextConverter
    app.register_blueprint(bp)
    app.register_error_handler(HTTPException, _http_error)
    app.before_request(_authenticate)
    app.after_request(_wake_held_asks)


def _wake_held_asks(response: Response) -> Response:
    """After a request that changed state (an update, a score, a dropout ...), the asks
    held for work look again (fedsim.aggregator.holding)."""
    changed = request.method not in ("GET", "HEAD") and request.path != "/v1/tasks"
    if changed and response.status_code < 400 and request.path.startswith("/v1/"):
        _state().holds.changed()
    return response


# --- tokens -----------------------------------------------------------------------------

OPEN_PATHS = frozenset({"/healthz"})  # probes never need a token


def _authenticate() -> Response | None:
    """401 without a token, 403 with an unknown one, for every request that changes
    state (and every read too under AUTH_READS). The token found is `g.token`.

    A request that changes state carries its token in the Authorization header only:
    a query string ends up in proxy and access logs. `?access_token=` (RFC 6750) is
    taken for reads alone (the dashboard under AUTH_READS), and never beside a header.
    """
    g.token = None
    reading = request.method in ("GET", "HEAD")
    if request.path in OPEN_PATHS or (reading and not _state().settings.auth_reads):
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


def _workers_only() -> Response | None:
    """Tasks name any logical client: only a token for all clients ("*") may take them."""
    token = g.get("token")
    if token is None or not token.for_workers:
        name = token.name if token is not None else "none"
        return error(403, "forbidden", f'token {name!r} is not a workers\' token ("*")')
    return None


def _state() -> State:
    return current_app.extensions["fedsim"]


def error(status: int, code: str, detail: str, **extra: Any) -> Response:
    response = jsonify(error=code, detail=detail, **extra)
    response.status_code = status
    return response


def _http_error(exc: HTTPException) -> Response:
    """Werkzeug's errors (404, 405, 413 from the read cap...) as JSON like ours."""
    code = "too_large" if exc.code == 413 else (exc.name or "error").lower().replace(" ", "_")
    return error(exc.code or 500, code, exc.description or exc.name)


def _read_body() -> bytes:
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


def _json_body() -> dict[str, Any]:
    """A small JSON object body, or Invalid (413 too large, 400 not a JSON object)."""
    if request.content_length is not None and request.content_length > MAX_JSON_BYTES:
        raise Invalid("too_large", f"body is over {MAX_JSON_BYTES} bytes", 413)
    raw = _read_body()
    if len(raw) > MAX_JSON_BYTES:
        raise Invalid("too_large", f"body is over {MAX_JSON_BYTES} bytes", 413)
    try:
        body = request.json_module.loads(raw or b"{}")
    except (ValueError, RecursionError):
        raise Invalid("bad_json", "body is not JSON") from None
    if not isinstance(body, dict):
        raise Invalid("bad_json", "body is not a JSON object")
    return body


def _bad(exc: Invalid) -> Response:
    return error(exc.status, exc.code, exc.detail)


@bp.get("/healthz")
def healthz() -> Response:
    """200 while the model is served; "degraded" (still 200, so a probe does not restart
    an aggregator that holds unsaved updates) while checkpoints cannot be written."""
    state = _state()
    if state.disk_error is not None:
        return jsonify(status="degraded", version=state.snapshot.version, detail=state.disk_error)
    return jsonify(status="ok", version=state.snapshot.version)


@bp.get("/v1/model")
def model() -> Response:
    """The global model; `?version=N` a past version kept for its evaluation;
    `?encoding=fp16` in half precision (COMPRESSION_DOWN=fp16), with its own ETag."""
    state = _state()
    snap = state.poll()
    encoding = request.args.get("encoding", "float32")
    if encoding not in ("float32", "fp16"):
        return error(
            400, "bad_encoding", f"encoding must be float32 or fp16, got {encoding[:20]!r}"
        )
    if encoding == "fp16" and state.settings.compression_down != "fp16":
        return error(
            400,
            "bad_encoding",
            "this aggregator serves fp16 only under COMPRESSION_DOWN=fp16: give the workers "
            "and the aggregator the same setting",
        )
    raw = request.args.get("version")
    if raw is not None:
        wanted = digits(raw)
        if wanted is None:
            return error(
                400,
                "bad_version",
                f"version must be an integer >= 0 in ASCII digits, got {raw[:40]!r}",
            )
        kept = state.snapshot_of(wanted)
        if kept is None:
            return error(
                404, "unknown_version", f"version {wanted} is not served (current: {snap.version})"
            )
        snap = kept
    body, etag = snap.encoded(encoding)
    if request.if_none_match.contains(etag):
        response = Response(status=304)
    else:
        response = Response(body, mimetype="application/octet-stream")
        state.metrics.bytes_sent(len(body))  # the bytes on the wire, in this encoding
    response.set_etag(etag)
    response.headers["X-Fedsim-Version"] = str(snap.version)
    response.headers["Cache-Control"] = "no-cache"  # revalidate: the model changes
    return response


@bp.post("/v1/workers")
def hello() -> Response:
    """A worker introduces itself: its short name, and how many workers are live."""
    if (refused := _workers_only()) is not None:
        return refused
    try:
        uid = worker_id(_json_body())
    except Invalid as exc:
        return _bad(exc)
    return jsonify(_state().hello(uid))


@bp.post("/v1/tasks")
def ask() -> Response:
    """A task for the worker, or `task: null` with why and when to ask again."""
    if (refused := _workers_only()) is not None:
        return refused
    try:
        asked = Ask.from_json(_json_body())
    except Invalid as exc:
        return _bad(exc)
    state = _state()
    offer, name, held = state.holds.ask(lambda: state.ask(asked.worker, asked.retries))
    wait = HELD_WAIT_HINT if held else min(offer.retry_after, MAX_WAIT_HINT)
    return jsonify(dataclasses.replace(offer, worker=name, retry_after=wait).to_json())


@bp.post("/v1/evaluations")
def evaluation() -> Response:
    """A worker's score of a version: {task, lease, worker, accuracy, loss}."""
    state = _state()
    if (refused := _workers_only()) is not None:
        return refused
    try:
        scored = Evaluation.from_json(_json_body())
    except Invalid as exc:
        return _bad(exc)
    try:
        entry = state.record_evaluation(
            scored.task, scored.lease, scored.accuracy, scored.loss, scored.worker
        )
    except Refused as exc:
        state.note_refusal(f"evaluation {scored.task}", exc.code, exc.reason)
        version, finished = state.info()
        return error(exc.status, exc.code, exc.reason, version=version, finished=finished)
    return jsonify(recorded=True, entry=entry)


@bp.post("/v1/dropouts")
def dropout() -> Response:
    """A worker gives back a training task its client dropped: {worker, task, lease}."""
    state = _state()
    if (refused := _workers_only()) is not None:
        return refused
    try:
        dropped = Dropout.from_json(_json_body())
    except Invalid as exc:
        return _bad(exc)
    try:
        attempt = state.give_back(dropped.task, dropped.lease)
    except Refused as exc:
        state.note_refusal(f"dropout of {dropped.task}", exc.code, exc.reason)
        version, finished = state.info()
        return error(exc.status, exc.code, exc.reason, version=version, finished=finished)
    return jsonify(given_back=True, task=dropped.task, attempt=attempt)


@bp.post("/v1/updates")
def post_update() -> Response:
    state = _state()
    limit = state.settings.max_update_bytes
    # Refuse by the declared size before reading a byte of the body.
    if request.content_length is not None and request.content_length > limit:
        return _refused(
            413,
            "too_large",
            f"body of {request.content_length} bytes is over MAX_UPDATE_BYTES={limit}",
        )
    try:
        body = _read_body()
    except Invalid as exc:
        return _refused(exc.status, exc.code, exc.detail)
    state.metrics.bytes_received(len(body))
    if len(body) > limit:
        return _refused(413, "too_large", f"body is over MAX_UPDATE_BYTES={limit}")
    try:
        update = uploads.parse(
            body,
            state.stages.receive,
            find_base=lambda version: intake.model_of(state, version),
            dtypes=state.stages.dtypes,
        )
    except uploads.BadUpdate as exc:
        return _refused(exc.status, exc.code, exc.detail)
    token = g.get("token")
    if token is None or not token.speaks_for(update.client_id):
        name = token.name if token is not None else "none"
        return _refused(
            403, "forbidden", f"token {name!r} may not speak for client {update.client_id}", update
        )
    try:
        uploads.check_claim(update, state.queue.check_genuine)  # a task's id needs its lease
        result = state.submit(update)
    except Refused as exc:
        response = _refused(exc.status, exc.code, exc.reason, update=update)
        if exc.status in (429, 503):
            response.headers["Retry-After"] = str(getattr(exc, "retry_after", 5))
        return response
    state.after_update()  # a checkpoint due is written by the ticker thread
    return jsonify(
        accepted=True, version=result.version, duplicate=result.duplicate, seq=result.seq
    )


@bp.get("/v1/updates/<text:update_id>")
def get_update(update_id: str) -> Response:
    """What became of an update (see State.lookup); `?seq=N` tells forgotten from lost."""
    if not valid_id(update_id):
        return error(
            400, "bad_update_id", "update_id must be 1-128 characters, none of them control"
        )
    raw = request.args.get("seq")
    seq = None if raw is None else digits(raw)
    if raw is not None and not seq:
        return error(
            400, "bad_seq", f"seq must be an integer >= 1 in ASCII digits, got {raw[:40]!r}"
        )
    answer = _state().lookup(update_id, seq)
    if answer["state"] == "unknown":
        detail = (
            f"update {update_id} is older than the updates remembered and was saved"
            if answer["forgotten"]
            else f"update {update_id} is not known here: never received, or lost in a restart"
        )
        return error(
            404,
            "unknown_update",
            detail,
            forgotten=answer["forgotten"],
            remembered_from=answer["remembered_from"],
        )
    return jsonify(answer)


def _refused(status: int, code: str, detail: str, update: uploads.Update | None = None) -> Response:
    state = _state()
    who = f"client {update.client_id} update {update.update_id}" if update else request.remote_addr
    log.warning("refused update from %s: %d %s: %s", who, status, code, detail)
    state.note_refusal(str(who), code, detail)
    if status == 409:
        version, finished = state.info()
        return error(status, code, detail, version=version, finished=finished)
    return error(status, code, detail)


@bp.get("/v1/history")
def get_history() -> Response:
    """The test accuracy and loss per evaluated version; `?format=csv` as CSV.

    A page: `?after=V` the entries of versions after V, `?limit=N` at most N of them
    (oldest first; `next` then names the `after` of the next page), so a poller asks
    only for what is new and an answer's size does not grow with the run's length."""
    args = {}
    for name, least in (("after", 0), ("limit", 1)):
        raw = request.args.get(name)
        if raw is not None:
            value = digits(raw)
            if value is None or value < least:
                return error(
                    400,
                    f"bad_{name}",
                    f"{name} must be an integer >= {least} in ASCII digits, got {raw[:40]!r}",
                )
            args[name] = value
    fmt = request.args.get("format", "json")
    if fmt not in ("json", "csv"):
        return error(400, "bad_format", f"format must be json or csv, got {fmt[:20]!r}")
    entries = _state().history(after=args.get("after", -1), limit=args.get("limit"))
    more = "limit" in args and len(entries) > args["limit"]
    if more:
        entries = entries[: args["limit"]]
    if fmt == "csv":
        return Response(history.to_csv(entries), mimetype="text/csv")
    return jsonify(history=entries, **({"next": entries[-1]["version"]} if more else {}))


@bp.get("/v1/status")
def status() -> Response:
    """The run's state; `?clients=N` (or `all`) client rows instead of the first 500."""
    raw = request.args.get("clients")
    limit: int | None = views.STATUS_CLIENTS
    if raw is not None:
        limit = None if raw == "all" else digits(raw)
        if raw != "all" and limit is None:
            return error(
                400,
                "bad_clients",
                f"clients must be an integer >= 0 in ASCII digits or all, got {raw[:40]!r}",
            )
    return jsonify(_state().status(limit))


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus' text format (see metrics.py for the names)."""
    registry = current_app.extensions["fedsim_metrics"]
    state = _state()
    registry.set_finished(state.info()[1])
    registry.workers_seen(state.live_workers())
    body, content_type = registry.render()
    return Response(body, content_type=content_type)
