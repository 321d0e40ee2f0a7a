"""The aggregator's HTTP API (see the README's API table).

Every refusal is JSON `{"error": <code>, "detail": <sentence>}` with a 4xx
status, and changes nothing that is served or saved.
"""

from __future__ import annotations

import dataclasses
import logging

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import PathConverter

from fedsim.aggregator import history, intake, uploads, views, web
from fedsim.aggregator.strategies import Refused
from fedsim.protocol import Ask, Dropout, Evaluation, Invalid, digits, valid_id, worker_id

log = logging.getLogger("fedsim.aggregator")

bp = Blueprint("api", __name__)

MAX_WAIT_HINT = 2.0  # longest retry_after the aggregator suggests to an idle worker
HELD_WAIT_HINT = 0.01  # after an ask held for a change: ask again at once


class AnyTextConverter(PathConverter):
    """Like `path`, but also matches control characters, so a bad id gets our 400."""

    regex = "[^/][\\s\\S]*?"


def init_app(app: Flask) -> None:
    app.url_map.converters["text"] = AnyTextConverter
    app.register_blueprint(bp)
    app.register_error_handler(HTTPException, web.http_error)
    app.before_request(web.authenticate)
    app.after_request(_wake_held_asks)


def _wake_held_asks(response: Response) -> Response:
    """After a request that changed state (an update, a score, a dropout ...), the asks
    held for work look again (fedsim.aggregator.holding)."""
    changed = request.method not in ("GET", "HEAD") and request.path != "/v1/tasks"
    if changed and response.status_code < 400 and request.path.startswith("/v1/"):
        web.state().holds.changed()
    return response


@bp.get("/healthz")
def healthz() -> Response:
    """200 while the model is served; "degraded" (still 200, so a probe does not restart
    an aggregator that holds unsaved updates) while checkpoints cannot be written."""
    state = web.state()
    if state.disk_error is not None:
        return jsonify(status="degraded", version=state.snapshot.version, detail=state.disk_error)
    return jsonify(status="ok", version=state.snapshot.version)


@bp.get("/v1/model")
def model() -> Response:
    """The global model; `?version=N` a past version kept for its evaluation;
    `?encoding=fp16` in half precision (COMPRESSION_DOWN=fp16), with its own ETag."""
    state = web.state()
    snap = state.poll()
    encoding = request.args.get("encoding", "float32")
    if encoding not in ("float32", "fp16"):
        return web.error(
            400, "bad_encoding", f"encoding must be float32 or fp16, got {encoding[:20]!r}"
        )
    if encoding == "fp16" and state.settings.compression_down != "fp16":
        return web.error(
            400,
            "bad_encoding",
            "this aggregator serves fp16 only under COMPRESSION_DOWN=fp16: give the workers "
            "and the aggregator the same setting",
        )
    raw = request.args.get("version")
    if raw is not None:
        wanted = digits(raw)
        if wanted is None:
            return web.error(
                400,
                "bad_version",
                f"version must be an integer >= 0 in ASCII digits, got {raw[:40]!r}",
            )
        kept = state.snapshot_of(wanted)
        if kept is None:
            return web.error(
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
    if (refused := web.workers_only()) is not None:
        return refused
    try:
        uid = worker_id(web.json_body())
    except Invalid as exc:
        return web.bad(exc)
    return jsonify(web.state().hello(uid))


@bp.post("/v1/tasks")
def ask() -> Response:
    """A task for the worker, or `task: null` with why and when to ask again."""
    if (refused := web.workers_only()) is not None:
        return refused
    try:
        asked = Ask.from_json(web.json_body())
    except Invalid as exc:
        return web.bad(exc)
    state = web.state()
    offer, name, held = state.holds.ask(lambda: state.ask(asked.worker, asked.retries))
    wait = HELD_WAIT_HINT if held else min(offer.retry_after, MAX_WAIT_HINT)
    return jsonify(dataclasses.replace(offer, worker=name, retry_after=wait).to_json())


@bp.post("/v1/evaluations")
def evaluation() -> Response:
    """A worker's score of a version: {task, lease, worker, accuracy, loss}."""
    state = web.state()
    if (refused := web.workers_only()) is not None:
        return refused
    try:
        scored = Evaluation.from_json(web.json_body())
    except Invalid as exc:
        return web.bad(exc)
    try:
        entry = state.record_evaluation(
            scored.task, scored.lease, scored.accuracy, scored.loss, scored.worker
        )
    except Refused as exc:
        where = f"evaluation {scored.task}"
        return web.refusal(where, exc.status, exc.code, exc.reason, tell_version=True)
    return jsonify(recorded=True, entry=entry)


@bp.post("/v1/dropouts")
def dropout() -> Response:
    """A worker gives back a training task its client dropped: {worker, task, lease}; with
    `diverged` (what was non-finite), a task whose training diverged: the run stops."""
    state = web.state()
    if (refused := web.workers_only()) is not None:
        return refused
    try:
        dropped = Dropout.from_json(web.json_body())
    except Invalid as exc:
        return web.bad(exc)
    try:
        if dropped.diverged is not None:  # the run stops: its model diverged on a client
            reason = state.diverged(dropped.task, dropped.lease, dropped.diverged)
            return jsonify(given_back=True, task=dropped.task, stopped=reason)
        attempt = state.give_back(dropped.task, dropped.lease)
    except Refused as exc:
        where = f"dropout of {dropped.task}"
        return web.refusal(where, exc.status, exc.code, exc.reason, tell_version=True)
    return jsonify(given_back=True, task=dropped.task, attempt=attempt)


@bp.post("/v1/updates")
def post_update() -> Response:
    state = web.state()
    limit = state.settings.max_update_bytes
    # Refuse by the declared size before reading a byte of the body.
    if request.content_length is not None and request.content_length > limit:
        return _refused(
            413,
            "too_large",
            f"body of {request.content_length} bytes is over MAX_UPDATE_BYTES={limit}",
        )
    try:
        body = web.read_body()
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
        return web.error(
            400, "bad_update_id", "update_id must be 1-128 characters, none of them control"
        )
    raw = request.args.get("seq")
    seq = None if raw is None else digits(raw)
    if raw is not None and not seq:
        return web.error(
            400, "bad_seq", f"seq must be an integer >= 1 in ASCII digits, got {raw[:40]!r}"
        )
    answer = web.state().lookup(update_id, seq)
    if answer["state"] == "unknown":
        detail = (
            f"update {update_id} is older than the updates remembered and was saved"
            if answer["forgotten"]
            else f"update {update_id} is not known here: never received, or lost in a restart"
        )
        return web.error(
            404,
            "unknown_update",
            detail,
            forgotten=answer["forgotten"],
            remembered_from=answer["remembered_from"],
        )
    return jsonify(answer)


def _refused(status: int, code: str, detail: str, update: uploads.Update | None = None) -> Response:
    who = f"client {update.client_id} update {update.update_id}" if update else request.remote_addr
    log.warning("refused update from %s: %d %s: %s", who, status, code, detail)
    return web.refusal(str(who), status, code, detail, tell_version=status == 409)


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
                return web.error(
                    400,
                    f"bad_{name}",
                    f"{name} must be an integer >= {least} in ASCII digits, got {raw[:40]!r}",
                )
            args[name] = value
    fmt = request.args.get("format", "json")
    if fmt not in ("json", "csv"):
        return web.error(400, "bad_format", f"format must be json or csv, got {fmt[:20]!r}")
    entries = web.state().history(after=args.get("after", -1), limit=args.get("limit"))
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
            return web.error(
                400,
                "bad_clients",
                f"clients must be an integer >= 0 in ASCII digits or all, got {raw[:40]!r}",
            )
    return jsonify(web.state().status(limit))


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus' text format (see metrics.py for the names)."""
    registry = current_app.extensions["fedsim_metrics"]
    state = web.state()
    registry.set_finished(state.info()[1])
    registry.workers_seen(state.live_workers())
    body, content_type = registry.render()
    return Response(body, content_type=content_type)
