"""What a worker sends: a request for work, an evaluation report, an update's metadata."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from fedsim.protocol.base import LEASE, Invalid, digits, record_json, valid_id

_SLICES = re.compile(r"^[0-9 ,-]{1,64}$")
# A metric in metadata, as `f"{value:.6f}"` writes it: ASCII digits and one point, no sign,
# space or exponent (Python's float() would also take " 1.5", "1_0", "inf" and other digits).
_DECIMAL = re.compile(r"^[0-9]{1,40}(\.[0-9]{1,40})?$")


def worker_id(data: Mapping[str, Any]) -> str:
    """The id a worker sends with each request (`worker`)."""
    uid = data.get("worker")
    if not isinstance(uid, str) or not valid_id(uid):
        raise Invalid("bad_worker", "worker must be a string of 1-128 printable characters")
    return uid


def task_answer(data: Mapping[str, Any], what: str, code: str = "bad_task") -> tuple[str, str, str]:
    """(worker, task, lease) of a worker's answer to a task; `what` names the task in the
    error (Invalid with `code`) when the id or the lease is malformed."""
    uid = worker_id(data)
    task, lease = data.get("task"), data.get("lease")
    if not isinstance(task, str) or not valid_id(task):
        raise Invalid(code, f"task must be {what}")
    if not isinstance(lease, str) or not LEASE.fullmatch(lease):
        raise Invalid(code, "lease must be the task's lease")
    return uid, task, lease


@dataclass(frozen=True)
class Ask:
    """A request for work: the worker's id and the retries it has needed so far."""

    worker: str
    retries: int = 0

    def to_json(self) -> dict[str, Any]:
        return record_json(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Ask:
        retries = data.get("retries", 0)  # only shown in /v1/status: a bad count counts 0
        ok = isinstance(retries, int) and not isinstance(retries, bool) and 0 <= retries < 10**9
        return cls(worker_id(data), retries if ok else 0)


@dataclass(frozen=True)
class Dropout:
    """A worker gives back a training task its client dropped (DROPOUT_MODE=abort), or whose
    training diverged (`diverged`: what was non-finite, one line; the run then stops)."""

    OMITTED: ClassVar[tuple[str, ...]] = ("diverged",)
    MAX_DETAIL: ClassVar[int] = 300
    worker: str
    task: str
    lease: str
    diverged: str | None = None

    def to_json(self) -> dict[str, Any]:
        return record_json(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Dropout:
        answer = task_answer(data, "the id of the training task given back")
        diverged = data.get("diverged")
        if diverged is not None and not (
            isinstance(diverged, str)
            and 0 < len(diverged) <= cls.MAX_DETAIL
            and diverged.isprintable()
        ):
            raise Invalid(
                "bad_dropout",
                f"diverged must be one line of 1-{cls.MAX_DETAIL} printable characters",
            )
        return cls(*answer, diverged=diverged)


@dataclass(frozen=True)
class Evaluation:
    """A worker's score of the version its evaluation task named."""

    BOUNDS: ClassVar[tuple[tuple[str, float], ...]] = (("accuracy", 1.0), ("loss", 1e9))
    worker: str
    task: str
    lease: str
    accuracy: float
    loss: float

    def to_json(self) -> dict[str, Any]:
        return record_json(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Evaluation:
        uid, task, lease = task_answer(data, "the evaluation task's id")
        scores = {}
        for key, hi in cls.BOUNDS:
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise Invalid("bad_metrics", f"{key} must be a number")
            try:
                value = float(value)  # a JSON integer of 400 digits overflows here
            except OverflowError:
                value = math.nan
            if not 0 <= value <= hi:  # NaN fails it too
                raise Invalid("bad_metrics", f"{key} must be a number from 0 to {hi:g}")
            scores[key] = value
        return cls(uid, task, lease, scores["accuracy"], scores["loss"])


@dataclass(frozen=True)
class UpdateMeta:
    """What travels with an update's weights, as strings in its safetensors header.

    `task` and `lease` are a worker's answer to a task (then `update_id` is the task
    id); a hand-started client sends neither. `slice`, `slices`, `round`, `loss`,
    `accuracy` and `retries` are for logs and the status page; `loss` and
    `accuracy` travel with 6 decimals. `stages` holds the fields a pipeline stage
    adds (a codec's name): sent as they are, they never override the fields above.
    """

    # The fields the aggregator keeps with the update (`Update.meta`), in this order.
    EXTRA: ClassVar[tuple[str, ...]] = ("slice", "slices", "loss", "accuracy", "retries")
    client_id: str
    update_id: str
    base_version: int
    num_samples: int
    task: str | None = None
    lease: str = ""
    slice: str | None = None  # "5", or as a hand-typed range "1-4"
    slices: str | None = None
    round: int | None = None
    loss: float | None = None
    accuracy: float | None = None
    retries: int | None = None
    stages: dict[str, str] = field(default_factory=dict)

    def extra(self) -> dict[str, Any]:
        """The optional fields sent, by name, as the aggregator keeps them with the update."""
        return {key: getattr(self, key) for key in self.EXTRA if getattr(self, key) is not None}

    def to_json(self) -> dict[str, str]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "stages" or value is None or (f.name == "lease" and self.task is None):
                continue
            out[f.name] = f"{value:.6f}" if f.name in ("loss", "accuracy") else str(value)
        return {**self.stages, **out}

    @classmethod
    def from_json(cls, meta: Mapping[str, str], *, max_samples: int) -> UpdateMeta:
        """The metadata of an upload, 1 <= num_samples <= `max_samples` (the training set's
        size). Present but malformed optional fields are refused too, so client bugs show;
        `round` is for log lines and never refused; other keys go to `stages`."""
        client_id = _ident(meta, "client_id")
        update_id = _ident(meta, "update_id")
        base_version = _integer(meta, "base_version", lo=0)
        extra: dict[str, Any] = {}
        for key in ("slice", "slices"):
            if key in meta:
                if not _SLICES.fullmatch(meta[key]):  # `$` alone would let a final newline in
                    raise Invalid("bad_metadata", f"{key} must look like 3 or 1-4")
                extra[key] = meta[key]
        for key in ("loss", "accuracy"):
            if key in meta:
                if not _DECIMAL.fullmatch(meta[key]):
                    raise Invalid(
                        "bad_metadata",
                        f"{key} must be a finite number in ASCII digits, such as 0.125000",
                    )
                extra[key] = float(meta[key])
        if "retries" in meta:
            extra["retries"] = _integer(meta, "retries", lo=0)
        num_samples = _integer(
            meta, "num_samples", lo=1, hi=max_samples, status=422, code="bad_num_samples"
        )
        task, lease = None, ""
        if "task" in meta:
            task = _ident(meta, "task")
            lease = meta.get("lease", "")
            if not LEASE.fullmatch(lease):
                raise Invalid("bad_metadata", "lease must be the task's lease (1-64 hex digits)")
            if update_id != task:
                raise Invalid("bad_metadata", "update_id must be the task id for a task's update")
        round_no = digits(meta.get("round"))
        stages = {k: v for k, v in meta.items() if k not in _META_KEYS}
        return cls(
            client_id, update_id, base_version, num_samples, task, lease, **extra,
            round=round_no, stages=stages,
        )  # fmt: skip


_META_KEYS = frozenset(f.name for f in fields(UpdateMeta)) - {"stages"}


def _ident(meta: Mapping[str, str], key: str) -> str:
    value = meta.get(key)
    if value is None:
        raise Invalid("bad_metadata", f"metadata has no {key}")
    if not valid_id(value):
        raise Invalid("bad_metadata", f"{key} must be 1-128 characters, none of them control")
    return value


def _integer(
    meta: Mapping[str, str],
    key: str,
    *,
    lo: int,
    hi: int | None = None,
    status: int = 400,
    code: str = "bad_metadata",
) -> int:
    raw = meta.get(key)
    value = digits(raw)  # ASCII digits alone: no sign, space, "_" or other scripts' digits
    if value is None or value < lo or (hi is not None and value > hi):
        shown = raw if raw is None or len(raw) <= 40 else raw[:40] + "..."
        bound = f" and <= {hi}" if hi is not None else ""
        plain = raw is None or (raw.isascii() and raw.isdigit())
        how = "" if plain else " (ASCII digits alone: no sign, space or _)"
        raise Invalid(code, f"{key} must be an integer >= {lo}{bound}, got {shown!r}{how}", status)
    return value
