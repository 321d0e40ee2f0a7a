"""The safetensors codec, its refusals of hostile bytes, and validation against a layout."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedsim import models, weights

LAYOUT = (("a/kernel", (2, 3)), ("a/bias", (3,)))


def tensors() -> dict[str, np.ndarray]:
    return {
        "a/kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
        "a/bias": np.array([0.5, -1.0, 2.0], dtype=np.float32),
    }


def raw(header: object, data: bytes = b"") -> bytes:
    """safetensors bytes with `header` as given: a dict (dumped), or JSON text."""
    if isinstance(header, bytes):
        text = header
    else:
        text = header.encode() if isinstance(header, str) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def one(dtype: str = "F32", shape: object = (2,), offsets: object = (0, 8)) -> dict:
    """A header entry for tensor `w`."""
    shape = list(shape) if isinstance(shape, tuple) else shape
    offsets = list(offsets) if isinstance(offsets, tuple) else offsets
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def refused(body: bytes, status: int, reason: str) -> None:
    with pytest.raises(weights.WeightsError) as info:
        weights.decode(body)
    assert info.value.status == status
    assert reason in info.value.reason, info.value.reason


# --- what is accepted ---------------------------------------------------------------------


def test_round_trip_keeps_tensors_and_metadata() -> None:
    data = weights.encode(tensors(), {"version": 3, "client_id": "client-1"})
    decoded, metadata = weights.decode(data)
    assert metadata == {"version": "3", "client_id": "client-1"}
    for name, tensor in tensors().items():
        np.testing.assert_array_equal(decoded[name], tensor)
        assert decoded[name].dtype == np.float32


def test_decode_reads_what_the_reference_writer_writes_and_the_reverse() -> None:
    ours = weights.encode(tensors(), {"k": "v"})
    theirs = st_save(tensors(), metadata={"k": "v"})
    for name, tensor in st_load(ours).items():
        np.testing.assert_array_equal(tensor, tensors()[name])
    decoded, metadata = weights.decode(theirs)
    assert metadata == {"k": "v"}
    for name, tensor in decoded.items():
        np.testing.assert_array_equal(tensor, tensors()[name])


def test_wire_dtypes_keep_their_dtype_when_allowed() -> None:
    # A codec's tensors (top-k's uint16 gaps and float16 values, int8 codes, masked words).
    arrays = {
        "g": np.array([0, 65535, 1], np.uint16),
        "h": np.array([0.5, -65504.0], np.float16),
        "q": np.array([-127, 127], np.int8),
        "i": np.array([-1, 2**31 - 1], np.int32),
        "m": np.array([2**64 - 1], np.uint64),
    }
    body = weights.encode(arrays, {}, wire=True)
    decoded, _ = weights.decode(body, dtypes=("U16", "F16", "I8", "I32", "U64"))
    for name, array in arrays.items():
        assert decoded[name].dtype == array.dtype
        np.testing.assert_array_equal(decoded[name], array)
    assert st_load(body)["g"].dtype == np.uint16  # the reference reader agrees
    assert weights.decode(weights.encode(arrays, {}))[0]["g"].dtype == np.float32  # not wire


def test_decoded_arrays_are_writable_copies() -> None:
    decoded, _ = weights.decode(weights.encode(tensors(), {}))
    decoded["a/bias"][0] = 7.0
    assert decoded["a/bias"][0] == 7.0


def test_scalars_empty_tensors_and_no_metadata_are_readable() -> None:
    header = {
        "s": one(shape=(), offsets=(0, 4)),
        "e": one(shape=(0, 5), offsets=(4, 4)),
        "v": one(shape=(1,), offsets=(4, 8)),
    }
    decoded, metadata = weights.decode(raw(header, struct.pack("<2f", 1.5, -2.0)))
    assert metadata == {}
    assert decoded["s"].shape == () and decoded["s"] == np.float32(1.5)
    assert decoded["e"].shape == (0, 5)
    assert decoded["v"].tolist() == [-2.0]


def test_metadata_null_reads_as_empty() -> None:
    assert weights.decode(raw({"__metadata__": None}))[1] == {}


def test_mlp_update_is_within_one_percent_of_its_float32_size() -> None:
    raw_size = 4 * models.parameter_count("mlp")
    assert raw_size == 796_840
    zeros = {name: np.zeros(shape, np.float32) for name, shape in models.SHAPES["mlp"]}
    meta = {
        "client_id": "client-12",
        "base_version": 123456,
        "num_samples": 5000,
        "update_id": "0" * 32,
        "slice": 12,
        "slices": "9-12",
        "loss": 0.123456789,
        "accuracy": 0.987654321,
        "retries": 2,
    }
    size = len(weights.encode(zeros, meta))
    assert raw_size < size <= raw_size * 1.01


# --- unreadable framing and JSON: 400 ---------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "too short for safetensors"),
        (b"\xff" * 8 + b"{}", "too large or truncated"),
        (struct.pack("<Q", 5) + b"nope!", "not JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (
            struct.pack("<Q", 40)
            + b'{"x": {"dtype": "F32", "shape": [9], "data_offsets": [0, 36]}}'[:40],
            "not JSON",
        ),
    ],
    ids=["empty", "size-prefix-huge", "not-json", "array", "cut-json"],
)
def test_unreadable_bodies_are_400(body: bytes, reason: str) -> None:
    refused(body, 400, reason)


def test_header_over_64_kb_is_400() -> None:
    header = json.dumps({"__metadata__": {"k": "x" * weights.MAX_HEADER_BYTES}}).encode()
    refused(struct.pack("<Q", len(header)) + header, 400, f"header of {len(header)} bytes")


def test_header_size_beyond_the_body_is_400() -> None:
    refused(struct.pack("<Q", 100) + b"{}", 400, "header of 100 bytes is too large or truncated")


def test_header_not_utf8_is_400() -> None:
    refused(raw('{"__metadata__": {}}'.encode("utf-16")), 400, "not UTF-8")


@pytest.mark.parametrize("where", ["root", "metadata", "shape"])
def test_header_nested_thousands_deep_is_400(where: str) -> None:
    deep = "[" * 5000 + "]" * 5000
    header = {
        "root": deep,
        "metadata": '{"__metadata__": {"k": ' + deep + "}}",
        "shape": '{"w": {"dtype": "F32", "shape": ' + deep + ', "data_offsets": [0, 0]}}',
    }[where]
    refused(raw(header), 400, "nested too deeply")


@pytest.mark.parametrize("field", ["shape", "data_offsets"])
def test_integer_literal_over_4300_digits_is_400(field: str) -> None:
    entry = json.dumps(one()).replace(
        '"' + field + '": [', '"' + field + '": [' + "9" * 5000 + ", "
    )
    refused(raw('{"w": ' + entry + "}", b"\0" * 8), 400, "integer of 5000 digits, at most 18")


def test_integer_past_u64_in_offsets_is_400() -> None:
    refused(raw(one(offsets=(0, 2**64 + 8)), b"\0" * 8), 400, "integer of 20 digits")


def test_shape_whose_size_overflows_u64_is_400() -> None:
    big = 10**18 - 1
    refused(
        raw({"w": one(shape=(big, big), offsets=(0, 8))}, b"\0" * 8),
        400,
        f"needs {4 * big * big} bytes",
    )


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_standard_json_constants_are_400(constant: str) -> None:
    refused(raw('{"__metadata__": {"k": ' + constant + "}}"), 400, f"{constant} is not JSON")


@pytest.mark.parametrize(
    "header",
    [
        '{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
        '"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
        '{"__metadata__": {"k": "a", "k": "b"}}',
        '{"w": {"dtype": "F32", "dtype": "BF16", "shape": [2], "data_offsets": [0, 8]}}',
    ],
    ids=["tensor", "metadata", "field"],
)
def test_duplicated_keys_are_400(header: str) -> None:
    key = "w" if header.count('"w"') == 2 else "k" if '"k"' in header else "dtype"
    refused(raw(header, b"\0" * 8), 400, f"duplicate key '{key}'")


# --- dtypes: 422 from the header alone ----------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "bits"),
    [
        ("BF16", 16),
        ("F16", 16),
        ("F8_E4M3", 8),
        ("F8_E5M2", 8),
        ("F8_E8M0", 8),
        ("F6_E2M3", 6),
        ("F4", 4),
        ("I32", 32),
        ("U16", 16),
        ("U8", 8),
        ("BOOL", 8),
        ("F64", 64),
        ("I64", 64),
        ("C64", 64),
    ],
)
def test_other_dtypes_are_422_from_the_header(dtype: str, bits: int) -> None:
    # Data sized for the dtype, not for F32: refused before any size check on the data.
    nbytes = -(-8 * bits // 8)
    refused(
        raw({"w": one(dtype, (8,), (0, nbytes))}, b"\1" * nbytes),
        422,
        f"tensor w is {dtype}, expected F32",
    )


def test_real_float16_file_is_422() -> None:
    refused(st_save({"w": np.ones(3, np.float16)}), 422, "tensor w is F16, expected F32")


def test_unknown_dtype_is_400() -> None:
    refused(raw({"w": one("F33")}, b"\0" * 8), 400, "tensor w has unknown dtype 'F33'")


@pytest.mark.parametrize("dtype", [32, None, ["F32"]])
def test_dtype_not_a_string_is_400(dtype: object) -> None:
    refused(raw({"w": one(dtype)}, b"\0" * 8), 400, "tensor w dtype is")


# --- entries, shapes, offsets: 400 ----------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "offsets", "reason"),
    [
        ([-2], (0, 8), "shape must be a list of at most 8 non-negative integers, got [-2]"),
        ([2.0], (0, 8), "got [2.0]"),
        ([True, True], (0, 8), "got [True, True]"),
        (["2"], (0, 8), "got ['2']"),
        ([[2]], (0, 8), "got [[2]]"),
        (2, (0, 8), "got 2"),
        ([1] * 9, (0, 4), "at most 8"),
        ([2], (8, 0), "data_offsets must be [begin, end] with 0 <= begin <= end, got [8, 0]"),
        ([2], (-8, 0), "got [-8, 0]"),
        ([2], (0, 8, 16), "got [0, 8, 16]"),
        ([2], (0,), "got [0]"),
        ([2], (0.0, 8), "got [0.0, 8]"),
        ([2], None, "got None"),
        ([2], (0, 12), "of shape [2] needs 8 bytes, its data_offsets span 12"),
        ([3], (0, 8), "needs 12 bytes, its data_offsets span 8"),
    ],
)
def test_bad_shapes_and_offsets_are_400(shape: object, offsets: object, reason: str) -> None:
    refused(raw({"w": one("F32", shape, offsets)}, b"\0" * 8), 400, reason)


def test_offsets_past_the_data_are_400() -> None:
    refused(
        raw({"w": one(offsets=(0, 8))}, b"\0" * 4),
        400,
        "describes 8 bytes of tensor data, the body holds 4",
    )


def test_offsets_far_past_the_data_are_400() -> None:
    big = 10**17
    refused(raw({"w": one(offsets=(big, big + 8))}, b"\0" * 8), 400, f"starts at byte {big}")


def test_overlapping_tensors_are_400() -> None:
    header = {"v": one(offsets=(0, 8)), "w": one(offsets=(4, 12))}
    refused(raw(header, b"\0" * 12), 400, "tensor w starts at byte 4 of the data, expected 8")


def test_gap_between_tensors_is_400() -> None:
    header = {"v": one(offsets=(0, 8)), "w": one(offsets=(12, 20))}
    refused(raw(header, b"\0" * 20), 400, "tensor w starts at byte 12 of the data, expected 8")


def test_trailing_bytes_after_the_tensors_are_400() -> None:
    refused(
        raw({"w": one()}, b"\0" * 12), 400, "describes 8 bytes of tensor data, the body holds 12"
    )


def test_data_shorter_than_the_header_says_is_400() -> None:
    data = weights.encode(tensors(), {})
    refused(data[:-4], 400, "the body holds 32")


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ([1, 2], "tensor w is an array, expected an object"),
        ("F32", "tensor w is a string, expected an object"),
        ({"dtype": "F32", "shape": [2]}, "tensor w has no data_offsets"),
        ({**one(), "extra": 1}, "tensor w has an unknown field 'extra'"),
    ],
)
def test_malformed_entries_are_400(entry: object, reason: str) -> None:
    refused(raw({"w": entry}, b"\0" * 8), 400, reason)


@pytest.mark.parametrize(
    ("name", "shown"),
    [("", "''"), ("x" * 257, "'xxxx"), ("a\nb", r"'a\nb'"), ("a\u202eb", r"'a\u202eb'")],
    ids=["empty", "long", "newline", "bidi-override"],
)
def test_bad_tensor_names_are_400(name: str, shown: str) -> None:
    refused(raw({name: one()}, b"\0" * 8), 400, f"tensor name {shown}")


# --- metadata: strings only, bounded --------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (5, "a number"),
        (1.5, "a number"),
        (None, "null"),
        (True, "a boolean"),
        ([], "an array"),
        ({}, "an object"),
    ],
)
def test_non_string_metadata_values_are_400(value: object, kind: str) -> None:
    refused(
        raw({"__metadata__": {"num_samples": value}}),
        400,
        f"metadata num_samples is {kind}, expected a string",
    )


def test_metadata_not_an_object_is_400() -> None:
    refused(raw({"__metadata__": ["k", "v"]}), 400, "__metadata__ is an array, expected an object")


def test_metadata_value_over_the_bound_is_400() -> None:
    limit = weights.MAX_METADATA_VALUE
    assert weights.decode(raw({"__metadata__": {"k": "9" * limit}}))[1]["k"] == "9" * limit
    refused(
        raw({"__metadata__": {"k": "9" * (limit + 1)}}),
        400,
        f"metadata k is {limit + 1} characters long, at most {limit}",
    )


def test_a_caller_may_allow_longer_metadata_values() -> None:
    body = raw({"__metadata__": {"k": "x" * 10_000}})
    assert weights.decode(body, max_value=10_000)[1]["k"] == "x" * 10_000


@pytest.mark.parametrize(
    ("key", "shown"),
    [("", "''"), ("k" * 129, "'kkk"), ("a\x00b", r"'a\x00b'"), ("a\u2028", r"'a\u2028'")],
)
def test_bad_metadata_keys_are_400(key: str, shown: str) -> None:
    refused(raw({"__metadata__": {key: "v"}}), 400, f"metadata key {shown}")


def test_metadata_lone_surrogate_is_400() -> None:
    refused(
        raw('{"__metadata__": {"client_id": "\\ud800"}}'),
        400,
        "metadata client_id holds a lone surrogate",
    )


# --- validation against a layout: 422 -------------------------------------------------------


def test_valid_tensors_pass() -> None:
    weights.validate(tensors(), LAYOUT)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda t: t.pop("a/bias"), r"missing \['a/bias'\]"),
        (lambda t: t.update(extra=np.zeros(1, np.float32)), r"unexpected \['extra'\]"),
        (lambda t: t.update({"a/bias": np.zeros(4, np.float32)}), r"shape \(4,\), expected \(3,\)"),
        (lambda t: t.update({"a/bias": np.zeros(3, np.float64)}), "float64, expected float32"),
        (lambda t: t["a/kernel"].__setitem__((0, 0), np.nan), "NaN or infinity"),
        (lambda t: t["a/bias"].__setitem__(1, np.inf), "NaN or infinity"),
    ],
)
def test_invalid_tensors_are_422(change, reason: str) -> None:
    bad = tensors()
    change(bad)
    with pytest.raises(weights.WeightsError, match=reason) as info:
        weights.validate(bad, LAYOUT)
    assert info.value.status == 422


def test_quote_makes_hostile_text_one_ascii_line() -> None:
    shown = weights.quote("a\nb\u202ec" + "x" * 100)
    assert shown.isascii() and "\n" not in shown and shown.endswith("...")


def test_decode_without_copies_gives_read_only_views_of_the_bytes() -> None:
    data = weights.encode({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, {"k": "v"})
    copied, _ = weights.decode(data)
    viewed, meta = weights.decode(data, copy=False)
    np.testing.assert_array_equal(viewed["w"], copied["w"])
    assert meta == {"k": "v"} and viewed["w"].shape == (2, 3)
    assert np.shares_memory(viewed["w"], np.frombuffer(data, dtype=np.uint8))
    assert not viewed["w"].flags.writeable
    with pytest.raises(ValueError):
        viewed["w"][0, 0] = 1.0  # nothing may write through to an upload's bytes
    copied["w"][0, 0] = 9.0  # a copy is the caller's own
    assert weights.decode(data)[0]["w"][0, 0] == 0.0
