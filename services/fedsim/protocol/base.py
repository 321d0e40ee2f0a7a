"""What every message shares: the refusal `Invalid`, the id grammar, typed JSON fields."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

# Ids are echoed in logs and saved in checkpoint metadata: short, and without control
# characters (C0, C1), line or paragraph separators or bidirectional overrides, which
# could forge or reorder log lines. A client id typed by hand may hold spaces.
_ID = re.compile(
    r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]{1,128}$"
)
LEASE = re.compile(r"^[0-9a-f]{1,64}$")  # a task's lease: a nonce and its HMAC, in hex
_CLIENT = re.compile(r"^client-([1-9][0-9]*)$")
# An integer on the wire: ASCII digits only, at most 18 (no sign, space, "_" or other
# scripts' digits, all of which Python's int() takes), far below int()'s 4,300-digit limit.
_DIGITS = re.compile(r"^[0-9]{1,18}$")


class Invalid(ValueError):
    """A message that breaks the protocol: short `code`, HTTP `status`, `detail` sentence."""

    def __init__(self, code: str, detail: str, status: int = 400) -> None:
        self.code, self.detail, self.status = code, detail, status
        super().__init__(detail)


def valid_id(value: str) -> bool:
    """Whether `value` is acceptable as a client, update, task or worker id."""
    return _ID.fullmatch(value) is not None  # fullmatch: `$` would let a final newline in


def digits(raw: object) -> int | None:
    """The integer `raw` spells in ASCII digits alone, else None (a sign, a space, a final
    newline, an underscore or another script's digits)."""
    return int(raw) if isinstance(raw, str) and _DIGITS.fullmatch(raw) else None


def client_id(number: int) -> str:
    """The id of planned logical client `number` (1-based)."""
    return f"client-{number}"


def client_number(client_id: str) -> int | None:
    """N of a planned client's id `client-N`; None for any other id (a hand-started one)."""
    match = _CLIENT.fullmatch(client_id)
    return int(match.group(1)) if match else None


# --- JSON fields (a task's, unless `code` says otherwise) ------------------------------------

_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", dict: "an object"}


def typed(data: Mapping[str, Any], key: str, *kinds: type, code: str = "bad_task") -> Any:
    """data[key] if it is one of `kinds` (JSON true is not the number 1), else Invalid."""
    value = data.get(key)
    if not isinstance(value, kinds) or isinstance(value, bool):
        names = " or ".join(_KIND_NAMES[k] for k in kinds)
        raise Invalid(code, f"{key} is missing or not {names}: {value!r:.40}")
    return value


def count(data: Mapping[str, Any], key: str, lo: int = 0) -> int:
    value = typed(data, key, int)
    if value < lo:
        raise Invalid("bad_task", f"{key} must be an integer >= {lo}, got {value}")
    return value


def optional(data: Mapping[str, Any], key: str, *kinds: type) -> Any:
    return None if data.get(key) is None else typed(data, key, *kinds)


def record_json(record: Any) -> dict[str, Any]:
    """A record's fields by name, records within as their JSON, a task's `kind` too;
    fields named in OMITTED are left out while None (earlier versions sent none)."""
    out = {"kind": record.kind} if hasattr(record, "kind") else {}
    for f in fields(record):
        value = getattr(record, f.name)
        if value is None and f.name in getattr(record, "OMITTED", ()):
            continue
        out[f.name] = value.to_json() if hasattr(value, "to_json") else value
    return out


def task_head(data: Mapping[str, Any]) -> tuple[str, str]:
    """A task's id and lease, checked."""
    task_id = typed(data, "id", str)
    if not valid_id(task_id):
        raise Invalid("bad_task", "a task id must be 1-128 characters, none of them control")
    lease = typed(data, "lease", str)
    if not LEASE.fullmatch(lease):
        raise Invalid("bad_task", f"task {task_id}: its lease must be 1-64 hex digits")
    return task_id, lease


def task_tail(data: Mapping[str, Any]) -> dict[str, Any]:
    """A task's worker name and timeout."""
    timeout = data.get("timeout") or 0.0
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise Invalid("bad_task", f"timeout must be a number, got {timeout!r:.40}")
    return {"worker": str(data.get("worker") or ""), "timeout": float(timeout)}
