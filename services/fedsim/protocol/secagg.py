"""Secure aggregation's messages: the phase tasks, the masking a training task carries, the
reports, and the masked input's metadata. Binary values travel as lowercase hex.

A `SecaggTask` asks a worker to act for logical client `client` in one phase of round
`round`'s attempt `nonce`: "keys" (advertise), "shares" (share keys with U1, whose
public keys it carries), "unmask" (it carries U1's keys, the ciphertexts addressed to
the client, the survivors U3 and the dropped U2 \\ U3). Phase 3 is a `TrainTask` with a
`Masking` (the attempt's nonce and U2's public keys). The worker answers a phase task
with a `SecaggReport`, and its training with a masked input (uint64 safetensors).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fedsim.protocol.base import (
    Invalid,
    client_id,
    client_number,
    count,
    record_json,
    task_head,
    task_tail,
    typed,
)
from fedsim.protocol.reports import task_answer

PHASES = ("keys", "shares", "unmask")  # the phase tasks; the masked input rides on training
MAX_CLIENTS = 1000  # entries in one message's maps: more than any round samples
_HEX = re.compile(r"^(?:[0-9a-f]{2}){1,1024}$")

Keys = dict[int, tuple[bytes, bytes]]  # client number -> (c_pk, s_pk)


def unhex(value: object, what: str, size: int | None = None, code: str = "bad_task") -> bytes:
    """The bytes of lowercase hex `value` (of `size` bytes when given), else Invalid."""
    if not isinstance(value, str) or not _HEX.fullmatch(value):
        raise Invalid(code, f"{what} must be lowercase hex, got {value!r:.40}")
    raw = bytes.fromhex(value)
    if size is not None and len(raw) != size:
        raise Invalid(code, f"{what} must be {size} bytes, got {len(raw)}")
    return raw


def _number(name: object, code: str) -> int:
    number = client_number(name) if isinstance(name, str) else None
    if number is None:
        raise Invalid(code, f"{name!r:.40} is not a client id client-N")
    return number


def _map(data: object, what: str, code: str) -> dict[str, Any]:
    if not isinstance(data, dict) or len(data) > MAX_CLIENTS:
        raise Invalid(code, f"{what} must be an object of at most {MAX_CLIENTS} clients")
    return data


def keys_json(keys: Mapping[int, tuple[bytes, bytes]]) -> dict[str, list[str]]:
    return {client_id(v): [c.hex(), s.hex()] for v, (c, s) in sorted(keys.items())}


def keys_from_json(data: object, code: str = "bad_task") -> Keys:
    out: Keys = {}
    for name, pair in _map(data, "keys", code).items():
        if not isinstance(pair, list) or len(pair) != 2:
            raise Invalid(code, f"the keys of {name:.40} must be [c_pk, s_pk]")
        out[_number(name, code)] = (
            unhex(pair[0], "c_pk", 32, code),
            unhex(pair[1], "s_pk", 32, code),
        )
    return out


def blobs_json(blobs: Mapping[int, bytes]) -> dict[str, str]:
    return {client_id(v): b.hex() for v, b in sorted(blobs.items())}


def blobs_from_json(data: object, what: str, code: str = "bad_task") -> dict[int, bytes]:
    return {
        _number(name, code): unhex(value, f"{what} of {name}", None, code)
        for name, value in _map(data, what, code).items()
    }


def numbers_from_json(data: object, what: str) -> list[int]:
    if not isinstance(data, list) or len(data) > MAX_CLIENTS:
        raise Invalid("bad_task", f"{what} must be a list of client ids")
    return [_number(name, "bad_task") for name in data]


@dataclass(frozen=True)
class Masking:
    """What a training task of phase 3 carries: the attempt, U2's public keys, and the
    weight the client multiplies its delta by (its samples; 1 under DP, whose mean is an
    equal-weight one). The aggregator divides the sum by the survivors' weights."""

    nonce: str
    keys: dict[str, list[str]]  # keys_json(U2)
    weight: int | None = None  # None: the task's samples

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"nonce": self.nonce, "keys": self.keys}
        return out if self.weight is None else {**out, "weight": self.weight}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Masking:
        nonce = typed(data, "nonce", str)
        unhex(nonce, "nonce", 16)
        keys = data.get("keys")
        keys_from_json(keys)
        weight = data.get("weight")
        ok = weight is None or (isinstance(weight, int) and not isinstance(weight, bool))
        if not ok or (weight is not None and weight < 1):
            raise Invalid(
                "bad_task", f"a masking's weight must be an integer >= 1, got {weight!r:.40}"
            )
        return cls(nonce, dict(keys), weight)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SecaggTask:
    """Act for `client` in phase `phase` of round `round`'s attempt `nonce`."""

    kind: ClassVar[str] = "secagg"
    id: str
    lease: str
    client: str
    round: int
    phase: str
    nonce: str
    threshold: int
    keys: dict[str, list[str]] = field(default_factory=dict)  # U1's (shares, unmask)
    received: dict[str, str] = field(default_factory=dict)  # unmask: sender -> ciphertext
    survivors: list[str] = field(default_factory=list)  # unmask: U3
    dropped: list[str] = field(default_factory=list)  # unmask: U2 \ U3
    worker: str = ""
    timeout: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return record_json(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SecaggTask:
        task_id, lease = task_head(data)
        phase = typed(data, "phase", str)
        if phase not in PHASES:
            raise Invalid("bad_task", f"task {task_id}: unknown secure aggregation phase")
        client = typed(data, "client", str)
        _number(client, "bad_task")
        nonce = typed(data, "nonce", str)
        unhex(nonce, "nonce", 16)
        keys, received = data.get("keys") or {}, data.get("received") or {}
        keys_from_json(keys)
        blobs_from_json(received, "received")
        survivors = data.get("survivors") or []
        dropped = data.get("dropped") or []
        numbers_from_json(survivors, "survivors")
        numbers_from_json(dropped, "dropped")
        return cls(
            task_id,
            lease,
            client,
            count(data, "round", lo=1),
            phase,
            nonce,
            count(data, "threshold", lo=1),
            dict(keys),
            dict(received),
            list(survivors),
            list(dropped),
            **task_tail(data),
        )

    @property
    def number(self) -> int:
        return _number(self.client, "bad_task")


@dataclass(frozen=True)
class SecaggReport:
    """A worker's answer to a phase task: its `phase` message for `client` in attempt `nonce`.

    keys: {"c_pk": hex, "s_pk": hex}; shares: {client-v: ciphertext for v};
    unmask: {client-v: the share of b_v (v survived) or s_sk_v (v dropped)}."""

    worker: str
    task: str
    lease: str
    nonce: str
    phase: str
    message: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {
            "worker": self.worker,
            "task": self.task,
            "lease": self.lease,
            "nonce": self.nonce,
            "phase": self.phase,
            "message": self.message,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SecaggReport:
        uid, task, lease = task_answer(data, "the phase task's id", "bad_report")
        nonce = data.get("nonce")
        unhex(nonce, "nonce", 16, "bad_report")
        phase = data.get("phase")
        if phase not in PHASES:
            raise Invalid("bad_report", f"phase must be one of {', '.join(PHASES)}")
        message = _map(data.get("message"), "message", "bad_report")
        if not all(isinstance(v, str) for v in message.values()):
            raise Invalid("bad_report", "message values must be hex strings")
        return cls(uid, task, lease, str(nonce), str(phase), dict(message))

    def public_keys(self) -> tuple[bytes, bytes]:
        if set(self.message) != {"c_pk", "s_pk"}:
            raise Invalid("bad_report", "a keys message holds c_pk and s_pk", 422)
        return (
            unhex(self.message["c_pk"], "c_pk", 32, "bad_report"),
            unhex(self.message["s_pk"], "s_pk", 32, "bad_report"),
        )

    def blobs(self) -> dict[int, bytes]:
        return blobs_from_json(self.message, self.phase, "bad_report")
