"""Model weights on the wire and on disk: safetensors bytes with string metadata.

safetensors stores raw little-endian tensors behind a JSON header: no pickle, so
reading an upload cannot run code, and the header's size is known from its first
8 bytes, so a hostile header is refused before it is parsed.

`decode` reads the format itself (https://github.com/huggingface/safetensors, "Format")
and is stricter than the reference reader: every header field is checked before a
byte of tensor data is looked at, so an unsupported dtype (BF16, F8, F4, ...) is
refused from the header alone, and the only exception that ever leaves it is
`WeightsError`: 400 for bytes that are not readable safetensors, 422 for readable
tensors of a dtype other than F32 (or, for a compressed update, the codec's
F16, I8 or U16: `decode(dtypes=...)`). What is refused beyond the reference reader:
duplicated JSON keys (two parsers could pick different values), integers of more
than 18 digits, nesting deeper than Python's recursion limit, JSON's non-standard
NaN/Infinity, unknown entry fields, non-printable names, and metadata values that
are not strings or are longer than `MAX_METADATA_VALUE`.
"""

from __future__ import annotations

import json
import math
import reprlib
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from safetensors.numpy import save

Tensors = dict[str, np.ndarray]
Layout = tuple[tuple[str, tuple[int, ...]], ...]

MAX_HEADER_BYTES = 64 * 1024  # the mlp's header is ~0.6 kB, the cnn's ~0.8 kB
MAX_NAME = 256  # tensor names; the models' longest is 13 characters
MAX_DIMS = 8  # the cnn's kernels have 4
MAX_INT_DIGITS = 18  # header integers stay below 2**63, where safetensors' u64 offsets live
MAX_METADATA_KEY = 128
# Below Python's 4,300-digit limit on int(str), so int() of any accepted value cannot fail on
# length; checkpoints, whose metadata holds saved update ids, pass a larger bound.
MAX_METADATA_VALUE = 4096

# Every dtype the safetensors format names; only F32 is accepted.
DTYPES = frozenset(
    {
        "BOOL",
        "F4",
        "F6_E2M3",
        "F6_E3M2",
        "U8",
        "I8",
        "F8_E5M2",
        "F8_E4M3",
        "F8_E8M0",
        "I16",
        "U16",
        "F16",
        "BF16",
        "I32",
        "U32",
        "F32",
        "C64",
        "F64",
        "I64",
        "U64",
    }
)
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxstring, _REPR.maxlong, _REPR.maxother = 3, 10, 40, 40, 40


class WeightsError(ValueError):
    """Bytes that are not usable weights. `status` is the HTTP status it maps to."""

    def __init__(self, status: int, reason: str) -> None:
        self.status, self.reason = status, reason
        super().__init__(reason)


class _Refused(ValueError):
    """Raised from inside the JSON parser's hooks; becomes WeightsError(400)."""


# The dtypes on the wire beside float32 weights: a compressed update's (fedsim.pipeline.
# compress: F16, I8, top-k's U16 gaps; I32 for error feedback's files) and secure
# aggregation's masked words (U64). Only F32 is read unless a caller
# allows more (`decode(dtypes=...)`).
WIRE = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
}
_KEPT = frozenset(
    {"f2", "i1", "u2", "i4", "u8"}
)  # kind and size of the dtypes `encode(wire=True)` keeps


def encode(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, object], *, wire: bool = False
) -> bytes:
    """safetensors bytes; tensors are stored as float32, metadata values as strings.

    With `wire`, tensors already of a `WIRE` dtype (a codec's float16, int8, uint16 gaps,
    int32, masked uint64 words) keep it.
    """

    def stored(value: np.ndarray) -> np.ndarray:
        array = np.asarray(value)
        if wire and f"{array.dtype.kind}{array.dtype.itemsize}" in _KEPT:
            return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        return np.asarray(value, dtype=np.float32, order="C")

    return save(
        {k: stored(v) for k, v in tensors.items()},
        metadata={k: str(v) for k, v in metadata.items()},
    )


def read_header(data: bytes) -> dict:
    """The JSON header of safetensors bytes, bounded in size. Raises WeightsError(400)."""
    return _header(data)[0]


def decode(
    data: bytes,
    *,
    max_value: int = MAX_METADATA_VALUE,
    dtypes: frozenset[str] | tuple[str, ...] = ("F32",),
    copy: bool = True,
) -> tuple[Tensors, dict[str, str]]:
    """Float32 tensors and string metadata from safetensors bytes.

    Raises WeightsError: 422 when a tensor's dtype is not one of `dtypes` (F32 alone unless
    a codec allows more of `WIRE`; decided from the header), 400 for anything else
    unreadable. Metadata values longer than `max_value` are refused. The arrays returned
    are writable copies, independent of `data`, in native byte order; with copy=False,
    read-only views of `data` where its byte order is the machine's (an upload's tensors,
    which nothing writes to: 800 kB not copied per mlp update).
    """
    header, start = _header(data)
    metadata = _metadata(header.pop("__metadata__", None), max_value)
    entries = [_entry(name, info, dtypes) for name, info in header.items()]
    _check_coverage([(n, s, b, e) for n, s, b, e, _ in entries], len(data) - start)
    tensors = {}
    for name, shape, begin, end, dtype in entries:
        wire = WIRE[dtype]
        count = (end - begin) // wire.itemsize
        flat = np.frombuffer(data, dtype=wire, count=count, offset=start + begin)
        if copy or not wire.isnative:
            flat = flat.astype(wire.newbyteorder("="))  # astype copies
        else:
            flat.flags.writeable = False  # a view of `data` (read-only if data is bytes)
        tensors[name] = flat.reshape(shape)
    return tensors, metadata


def validate(tensors: Mapping[str, np.ndarray], layout: Layout) -> None:
    """Check names, shapes, dtype and finiteness against a model's layout. Raises WeightsError(422)."""
    check_layout(tensors, layout)
    for name, _ in layout:
        tensor = tensors[name]
        if tensor.dtype != np.float32:
            raise WeightsError(422, f"tensor {name} is {tensor.dtype}, expected float32")
        if not np.isfinite(tensor).all():
            raise WeightsError(422, f"tensor {name} contains NaN or infinity")


def check_layout(tensors: Mapping[str, np.ndarray], layout: Layout) -> None:
    """Check names and shapes alone (any dtype) against a layout. Raises WeightsError(422)."""
    expected = dict(layout)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise WeightsError(422, f"wrong tensor names: missing {missing}, unexpected {extra}")
    for name, shape in layout:
        if tensors[name].shape != shape:
            got = tensors[name].shape
            raise WeightsError(422, f"tensor {name} has shape {got}, expected {shape}")


def layout_of(tensors: Mapping[str, np.ndarray]) -> Layout:
    return tuple((name, tuple(t.shape)) for name, t in tensors.items())


# --- the header -------------------------------------------------------------------------


def _header(data: bytes) -> tuple[dict[str, Any], int]:
    """The parsed header and the offset where tensor data starts. Raises WeightsError(400)."""
    if len(data) < 8:
        raise WeightsError(400, f"body is {len(data)} bytes, too short for safetensors")
    (size,) = struct.unpack("<Q", data[:8])
    if size > MAX_HEADER_BYTES or size > len(data) - 8:
        raise WeightsError(400, f"safetensors header of {size} bytes is too large or truncated")
    try:
        text = bytes(data[8 : 8 + size]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WeightsError(400, f"safetensors header is not UTF-8: {exc.reason}") from None
    try:
        header = json.loads(
            text,
            object_pairs_hook=_object,
            parse_int=_integer,
            parse_constant=_constant,
        )
    except _Refused as exc:
        raise WeightsError(400, f"safetensors header refused: {exc}") from None
    except RecursionError:
        raise WeightsError(400, "safetensors header is not JSON: nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise WeightsError(400, f"safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WeightsError(400, "safetensors header is not a JSON object")
    return header, 8 + size


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"duplicate key {quote(key)}")
        out[key] = value
    return out


def _integer(text: str) -> int:
    digits = len(text) - text.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise _Refused(f"integer of {digits} digits, at most {MAX_INT_DIGITS}")
    return int(text)


def _constant(name: str) -> float:
    raise _Refused(f"{name} is not JSON")


def _metadata(raw: object, max_value: int) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise WeightsError(400, f"safetensors __metadata__ is {_kind(raw)}, expected an object")
    for key, value in raw.items():
        if not 1 <= len(key) <= MAX_METADATA_KEY or not key.isprintable():
            raise WeightsError(
                400,
                f"metadata key {quote(key)} must be 1-{MAX_METADATA_KEY} printable characters",
            )
        if not isinstance(value, str):
            raise WeightsError(400, f"metadata {key} is {_kind(value)}, expected a string")
        if len(value) > max_value:
            raise WeightsError(
                400, f"metadata {key} is {len(value)} characters long, at most {max_value}"
            )
        if not _utf8(value):
            raise WeightsError(400, f"metadata {key} holds a lone surrogate, not UTF-8")
    return raw


def _entry(
    name: str, info: object, dtypes: frozenset[str] | tuple[str, ...] = ("F32",)
) -> tuple[str, tuple[int, ...], int, int, str]:
    """(name, shape, begin, end, dtype) of one header entry, checked. Raises WeightsError."""
    if not 1 <= len(name) <= MAX_NAME or not name.isprintable():
        raise WeightsError(
            400, f"tensor name {quote(name)} must be 1-{MAX_NAME} printable characters"
        )
    if not isinstance(info, dict):
        raise WeightsError(400, f"tensor {name} is {_kind(info)}, expected an object")
    for field in _ENTRY_FIELDS:
        if field not in info:
            raise WeightsError(400, f"tensor {name} has no {field}")
    for field in info:
        if field not in _ENTRY_FIELDS:
            raise WeightsError(400, f"tensor {name} has an unknown field {quote(field)}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        raise WeightsError(400, f"tensor {name} dtype is {_kind(dtype)}, expected a string")
    if dtype not in DTYPES:
        raise WeightsError(400, f"tensor {name} has unknown dtype {quote(dtype)}")
    if dtype not in dtypes or dtype not in WIRE:
        expected = " or ".join(d for d in WIRE if d in dtypes)
        raise WeightsError(422, f"tensor {name} is {dtype}, expected {expected}")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_natural(d) for d in shape)):
        raise WeightsError(
            400,
            f"tensor {name} shape must be a list of at most {MAX_DIMS} non-negative integers,"
            f" got {_brief(shape)}",
        )
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_natural(o) for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise WeightsError(
            400,
            f"tensor {name} data_offsets must be [begin, end] with 0 <= begin <= end,"
            f" got {_brief(offsets)}",
        )
    begin, end = offsets
    needed = WIRE[dtype].itemsize * math.prod(shape)
    if end - begin != needed:
        raise WeightsError(
            400,
            f"tensor {name} of shape {shape} needs {needed} bytes,"
            f" its data_offsets span {end - begin}",
        )
    return name, tuple(shape), begin, end, dtype


def _check_coverage(entries: list[tuple[str, tuple[int, ...], int, int]], size: int) -> None:
    """Tensors must tile the data buffer exactly: no gap, no overlap, no trailing bytes."""
    position = 0
    for name, _, begin, end in sorted(entries, key=lambda e: (e[2], e[3])):
        if begin != position:
            raise WeightsError(
                400, f"tensor {name} starts at byte {begin} of the data, expected {position}"
            )
        position = end
    if position != size:
        raise WeightsError(
            400, f"the header describes {position} bytes of tensor data, the body holds {size}"
        )


def _natural(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _kind(value: object) -> str:
    """A JSON value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a string"


def _brief(value: object) -> str:
    """A short ASCII picture of a parsed JSON value (depth and length cut, no recursion risk)."""
    return _REPR.repr(value).encode("ascii", "backslashreplace").decode()


def quote(text: str, limit: int = 64) -> str:
    """A hostile string made safe for a one-line message and a log: ASCII, quoted, cut."""
    return ascii(text[:limit]) + ("..." if len(text) > limit else "")
