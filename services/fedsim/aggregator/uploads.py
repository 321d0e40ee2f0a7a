"""Reading one client upload: safetensors bytes -> a validated `Update`, or a precise refusal.

Metadata (all strings in the safetensors header): `client_id`, `update_id`,
`base_version`, `num_samples`, and optionally `task` and `lease` (a worker's
answer to a task; its update_id is the task id), `slice`, `slices`, `loss`,
`accuracy`, `retries`. The checks run outside the state lock, so a slow or bad
upload never holds up the others.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedsim import weights
from fedsim.aggregator.strategies import Update
from fedsim.config import TRAIN_IMAGES

# Ids are echoed in logs and saved in checkpoint metadata: short, and without control
# characters (C0, C1), line or paragraph separators or bidirectional overrides, which
# could forge or reorder log lines. A client id typed by hand may hold spaces.
_ID = re.compile(
    r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]{1,128}$"
)
_LEASE = re.compile(r"^[0-9a-f]{1,64}$")
MAX_WEIGHT = 1e6  # the largest weight an update may hold (the global model's bound too)
_DIGITS = 18  # integers in metadata: enough for any count, far below Python's 4,300-digit limit
_SLICES = re.compile(r"^[0-9 ,-]{1,64}$")


class BadUpdate(Exception):
    """An upload refused before it reaches the strategy: HTTP `status`, short `code`."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        self.status, self.code, self.detail = status, code, detail
        super().__init__(detail)


def valid_id(value: str) -> bool:
    """Whether `value` is acceptable as a client_id or update_id."""
    return _ID.fullmatch(value) is not None  # fullmatch: `$` would let a final newline in


def _ident(meta: Mapping[str, str], key: str) -> str:
    value = meta.get(key)
    if value is None:
        raise BadUpdate(400, "bad_metadata", f"metadata has no {key}")
    if not valid_id(value):
        raise BadUpdate(
            400, "bad_metadata", f"{key} must be 1-128 characters, none of them control"
        )
    return value


def _integer(
    meta: Mapping[str, str], key: str, *, lo: int, status: int, code: str, hi: int | None = None
) -> int:
    raw = meta.get(key)
    try:
        value = int(raw) if raw is not None and len(raw) <= _DIGITS else None
    except ValueError:
        value = None
    if value is None or value < lo or (hi is not None and value > hi):
        shown = raw if raw is None or len(raw) <= 40 else raw[:40] + "..."
        bound = f" and <= {hi}" if hi is not None else ""
        raise BadUpdate(status, code, f"{key} must be an integer >= {lo}{bound}, got {shown!r}")
    return value


def _optional(meta: Mapping[str, str]) -> dict[str, Any]:
    """Optional client metrics; present but malformed is refused, so client bugs show."""
    out: dict[str, Any] = {}
    for key in ("slice", "slices"):
        if key in meta:
            if not _SLICES.fullmatch(meta[key]):  # `$` alone would let a final newline in
                raise BadUpdate(400, "bad_metadata", f"{key} must look like 3 or 1-4")
            out[key] = meta[key]
    for key in ("loss", "accuracy"):
        if key in meta:
            try:
                value = float(meta[key])
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise BadUpdate(400, "bad_metadata", f"{key} must be a finite number")
            out[key] = value
    if "retries" in meta:
        out["retries"] = _integer(meta, "retries", lo=0, status=400, code="bad_metadata")
    return out


def parse(body: bytes, layout: weights.Layout) -> Update:
    """The update in `body`, checked against the model's layout. Raises BadUpdate."""
    try:
        tensors, meta = weights.decode(body)
    except weights.WeightsError as exc:
        code = "unreadable" if exc.status == 400 else "invalid_weights"
        raise BadUpdate(exc.status, code, exc.reason) from None
    client_id = _ident(meta, "client_id")
    update_id = _ident(meta, "update_id")
    base_version = _integer(meta, "base_version", lo=0, status=400, code="bad_metadata")
    extra = _optional(meta)
    num_samples = _integer(
        meta, "num_samples", lo=1, hi=TRAIN_IMAGES, status=422, code="bad_num_samples"
    )
    task_id, lease = None, ""
    if "task" in meta:
        task_id = _ident(meta, "task")
        lease = meta.get("lease", "")
        if not _LEASE.fullmatch(lease):
            raise BadUpdate(400, "bad_metadata", "lease must be the task's lease (1-64 hex digits)")
        if update_id != task_id:
            raise BadUpdate(
                400, "bad_metadata", "update_id must be the task id for a task's update"
            )
    try:
        weights.validate(tensors, layout)
    except weights.WeightsError as exc:
        raise BadUpdate(422, "invalid_weights", exc.reason) from None
    for name, tensor in tensors.items():
        # Finite is not enough: two updates of +-3e38 overflow a mean. No trained weight
        # comes near this bound; a sender that does is refused before any rule sees it.
        peak = float(np.abs(tensor).max(initial=0.0))
        if peak > MAX_WEIGHT:
            raise BadUpdate(
                422, "invalid_weights", f"tensor {name} holds {peak:.3g}, beyond {MAX_WEIGHT:g}"
            )
    return Update(client_id, update_id, base_version, num_samples, tensors, extra, task_id, lease)
