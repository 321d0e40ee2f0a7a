"""SECAGG=true's two routes: a worker's phase report, and a masked input.

- `POST /v1/secagg`: JSON `SecaggReport` (protocol/secagg.py), at most MAX_REPORT_BYTES:
  a client's public keys, its encrypted shares, or its unmasking shares.
- `POST /v1/secagg/masked`: safetensors of uint64 (U64) tensors with the model's exact
  names and shapes; metadata task, lease, nonce, client_id, worker.

Both take the workers' token only, answer 200 `{"recorded"|"accepted": true, ...}`,
400/413/422 for a malformed body, 409 for a report of an attempt or phase that is over,
and change nothing on a refusal. The aggregator cannot check a masked input's values
(they are uniform by design): it checks the unmasked mean when the round closes.
"""

from __future__ import annotations

import json
import logging

from flask import Blueprint, Flask, Response, g, jsonify, request

from fedsim import models, weights
from fedsim.aggregator import secure, web
from fedsim.aggregator.strategies import Refused
from fedsim.protocol import Invalid, SecaggReport, client_number, valid_id
from fedsim.protocol.base import LEASE

log = logging.getLogger("fedsim.aggregator")

bp = Blueprint("secagg", __name__)

MAX_REPORT_BYTES = 1 << 20  # 1,000 clients' shares in hex are ~330 kB
MASKED_META = ("task", "lease", "nonce", "client_id", "worker")


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)


def _refused(status: int, code: str, detail: str) -> Response:
    log.warning("refused secure aggregation message: %d %s: %s", status, code, detail)
    return web.refusal(request.path, status, code, detail, tell_version=status == 409)


@bp.post("/v1/secagg")
def report() -> Response:
    if (refused := web.workers_only()) is not None:
        return refused
    if request.content_length is not None and request.content_length > MAX_REPORT_BYTES:
        return _refused(413, "too_large", f"body is over {MAX_REPORT_BYTES} bytes")
    try:
        raw = web.read_body()
        if len(raw) > MAX_REPORT_BYTES:
            raise Invalid("too_large", f"body is over {MAX_REPORT_BYTES} bytes", 413)
        try:
            body = json.loads(raw or b"{}")
        except (ValueError, RecursionError):
            raise Invalid("bad_json", "body is not JSON") from None
        if not isinstance(body, dict):
            raise Invalid("bad_json", "body is not a JSON object")
        msg = SecaggReport.from_json(body)
    except Invalid as exc:
        return _refused(exc.status, exc.code, exc.detail)
    state = web.state()
    state.metrics.bytes_received(len(raw))
    try:
        answer = state.secure(lambda core, now: secure.report(core, msg, len(raw), now))
    except Invalid as exc:
        return _refused(exc.status, exc.code, exc.detail)
    except Refused as exc:
        return _refused(exc.status, exc.code, exc.reason)
    return jsonify(answer)


@bp.post("/v1/secagg/masked")
def masked() -> Response:
    if (refused := web.workers_only()) is not None:
        return refused
    state = web.state()
    limit = state.settings.max_update_bytes
    if request.content_length is not None and request.content_length > limit:
        return _refused(413, "too_large", f"body is over MAX_UPDATE_BYTES={limit}")
    try:
        body = web.read_body()
    except Invalid as exc:
        return _refused(exc.status, exc.code, exc.detail)
    if len(body) > limit:
        return _refused(413, "too_large", f"body is over MAX_UPDATE_BYTES={limit}")
    state.metrics.bytes_received(len(body))
    try:
        tensors, meta = weights.decode(body, dtypes=("U64",))
        weights.check_layout(tensors, models.SHAPES[state.settings.model])
    except weights.WeightsError as exc:
        code = "unreadable" if exc.status == 400 else "invalid_masked_input"
        return _refused(exc.status, code, exc.reason)
    problem = _bad_meta(meta)
    if problem:
        return _refused(400, "bad_metadata", problem)
    token = g.get("token")
    if token is None or not token.speaks_for(meta["client_id"]):
        return _refused(403, "forbidden", f"the token may not speak for {meta['client_id']}")
    try:
        answer = state.secure(
            lambda core, now: secure.masked(
                core, meta["task"], meta["lease"], meta["nonce"], meta["client_id"],
                meta["worker"], tensors, len(body), now,
            )
        )  # fmt: skip
    except Refused as exc:
        return _refused(exc.status, exc.code, exc.reason)
    return jsonify(answer)


def _bad_meta(meta: dict[str, str]) -> str:
    """Why a masked input's metadata is unusable, or ''."""
    missing = [key for key in MASKED_META if key not in meta]
    if missing:
        return f"metadata lacks {', '.join(missing)}"
    if not valid_id(meta["task"]) or not valid_id(meta["worker"]):
        return "task and worker must be ids of 1-128 printable characters"
    if not LEASE.fullmatch(meta["lease"]):
        return "lease must be the task's lease"
    if client_number(meta["client_id"]) is None:
        return "client_id must be client-N"
    nonce = meta["nonce"]
    if len(nonce) != 32 or any(c not in "0123456789abcdef" for c in nonce):
        return "nonce must be the attempt's 32 hex digits"
    return ""
