"""The aggregator's Flask app factory and its HTTP API (see the README's API table).

gunicorn runs it as `fedsim.aggregator.app:create_app()` in one worker process
with threads: the global state lives in that process.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import PathConverter

from fedsim import config
from fedsim.aggregator import uploads
from fedsim.aggregator.state import StartupError, State
from fedsim.aggregator.strategies import Refused

log = logging.getLogger("fedsim.aggregator")

# gunicorn's "worker failed to boot" exit code: it stops instead of respawning the worker.
WORKER_BOOT_ERROR = 3

bp = Blueprint("api", __name__)


class AnyTextConverter(PathConverter):
    """Like `path`, but also matches control characters, so a bad id gets our 400."""

    regex = "[^/][\\s\\S]*?"


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app. Settings come from the environment, or FEDSIM_SETTINGS in `test_config`."""
    app = Flask(__name__)
    app.config.from_mapping(
        FEDSIM_SETTINGS=None,  # a config.Settings; None: read the environment
        FEDSIM_CLOCK=None,  # monotonic clock for round timeouts and idle saves (tests swap it)
        FEDSIM_TICKER=True,  # background thread for round timeouts and idle saves
    )
    if test_config is not None:
        app.config.from_mapping(test_config)
    try:
        settings = app.config["FEDSIM_SETTINGS"] or config.load()
        clock = app.config["FEDSIM_CLOCK"]
        state = State.resume(settings, **({"clock": clock} if clock else {}))
    except (config.ConfigError, StartupError) as exc:
        log.error("fedsim aggregator: error: %s", exc)
        raise SystemExit(WORKER_BOOT_ERROR) from exc
    # Werkzeug caps the body it reads, also without a Content-Length; one byte over the
    # limit so that a body it cut short is still seen to be too large.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_update_bytes + 1
    app.extensions["fedsim"] = state
    app.url_map.converters["text"] = AnyTextConverter
    app.register_blueprint(bp)
    app.register_error_handler(HTTPException, _http_error)
    if app.config["FEDSIM_TICKER"]:
        # Often enough to close a timed-out round or save when idle without much delay.
        state.start_ticker(
            max(0.05, min(1.0, settings.idle_save_seconds / 4, settings.round_timeout / 4))
        )
    return app


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


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify(status="ok", version=_state().snapshot.version)


@bp.get("/v1/model")
def model() -> Response:
    snap = _state().poll()
    if request.if_none_match.contains(snap.etag):
        response = Response(status=304)
    else:
        response = Response(snap.body, mimetype="application/octet-stream")
    response.set_etag(snap.etag)
    response.headers["Cache-Control"] = "no-cache"  # revalidate: the model changes
    return response


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
    body = request.get_data(cache=False)
    if len(body) > limit:
        return _refused(413, "too_large", f"body is over MAX_UPDATE_BYTES={limit}")
    try:
        update = uploads.parse(body, state.layout)
    except uploads.BadUpdate as exc:
        return _refused(exc.status, exc.code, exc.detail)
    try:
        result = state.submit(update)
    except Refused as exc:
        return _refused(409, exc.code, exc.reason, update=update)
    state.save_if_due(wait=False)
    return jsonify(
        accepted=True, version=result.version, duplicate=result.duplicate, seq=result.seq
    )


@bp.get("/v1/updates/<text:update_id>")
def get_update(update_id: str) -> Response:
    """What became of an update (see State.lookup); `?seq=N` tells forgotten from lost."""
    if not uploads.valid_id(update_id):
        return error(
            400, "bad_update_id", "update_id must be 1-128 characters, none of them control"
        )
    raw = request.args.get("seq")
    try:
        seq = int(raw) if raw is not None else None
    except ValueError:
        seq = -1
    if seq is not None and seq < 1:
        return error(400, "bad_seq", f"seq must be an integer >= 1, got {raw!r}")
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
    if status == 409:
        version, finished = state.info()
        return error(status, code, detail, version=version, finished=finished)
    return error(status, code, detail)


@bp.get("/v1/status")
def status() -> Response:
    return jsonify(_state().status())
