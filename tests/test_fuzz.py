"""Property tests (Hypothesis) of the two places hostile bytes come in: uploads and checkpoints.

Uploads: `uploads.parse` on random bytes, on valid bodies with bytes changed, cut or added,
and on generated headers (random JSON, deep nesting, huge numbers, every dtype, odd shapes
and offsets, non-string metadata) never raises anything but `BadUpdate`, and what it
accepts is a finite float32 update of the model's layout. What `weights.decode` accepts,
the reference safetensors reader reads the same.

Checkpoints: `checkpoints.read` on random or damaged files raises only WeightsError or
OSError; a flipped bit either is refused or leaves the tensors as saved (the checksum);
`load_newest` never raises and falls back to the older good file.

Runs are derandomized and keep no example database, so every run tries the same inputs.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load as st_load

from fedsim import checkpoints, weights
from fedsim.aggregator import uploads
from fedsim.pipeline import Pipeline
from fedsim.pipeline.checks import Validate

LAYOUT = (("a/kernel", (2, 3)), ("a/bias", (3,)))
RECEIVE = Pipeline([Validate(LAYOUT)]).receive  # the aggregator's receive side for LAYOUT
META = {"client_id": "c-1", "update_id": "u-1", "base_version": "0", "num_samples": "5"}


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def valid_tensors() -> dict[str, np.ndarray]:
    return {
        "a/kernel": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
        "a/bias": np.array([0.5, -1.0, 2.0], np.float32),
    }


VALID_BODY = weights.encode(valid_tensors(), META)


def parse_or_refuse(body: bytes) -> None:
    """Call parse; only BadUpdate may come out, and an accepted update must be sound."""
    try:
        update = uploads.parse(body, RECEIVE)
    except uploads.BadUpdate as exc:
        assert exc.status in (400, 413, 422), exc.status
        assert exc.code and exc.detail
        return
    assert {name: t.shape for name, t in update.tensors.items()} == dict(LAYOUT)
    for tensor in update.tensors.values():
        assert tensor.dtype == np.float32 and np.isfinite(tensor).all()


def agrees_with_the_reference_reader(body: bytes) -> None:
    """When decode accepts bytes, safetensors reads the same tensors from them."""
    try:
        ours, _ = weights.decode(body)
    except weights.WeightsError:
        return
    theirs = st_load(body)
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name])


# --- byte-level mutation --------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """`base` with a few bytes replaced, cut, inserted or removed."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "byte", "truncate", "insert", "delete", "prefix"]))
        where = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte" and data:
            data[where] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[where:]
        elif kind == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[where : where + draw(st.integers(1, 16))]
        elif kind == "prefix":  # the 8-byte header size
            data[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    return bytes(data)


# --- generated headers ----------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
HOSTILE_NUMBERS = st.sampled_from(
    [-1, 2**63, 2**64, 2**64 + 8, 10**18, 10**18 - 1, True, 1.5, 1e308]
)
DTYPES = st.sampled_from(sorted(weights.DTYPES)) | st.text(max_size=8) | JSON
TEXT_ATTACKS = ["none", "deep", "deep-in-metadata", "huge-int", "duplicate", "nan", "surrogate"]


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """A body whose header starts valid for LAYOUT and is then spoiled a few ways."""
    tensors = {name: list(shape) for name, shape in LAYOUT}
    for _ in range(draw(st.integers(0, 2))):  # drop, add or reshape tensors
        name = draw(st.sampled_from([n for n, _ in LAYOUT]) | st.text(max_size=6))
        if draw(st.booleans()):
            tensors.pop(name, None)
        else:
            tensors[name] = draw(st.lists(st.integers(0, 4), max_size=3))
    header: dict = {}
    position = 0
    for name, shape in tensors.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [position, position + size]}
        position += size
    header["__metadata__"] = dict(META)
    for _ in range(draw(st.integers(0, 3))):  # spoil one field
        target = draw(st.sampled_from([*header, None]))
        if target is None:
            header[draw(st.text(max_size=6))] = draw(JSON)
        elif target == "__metadata__":
            key = draw(st.sampled_from([*META, "loss", "retries", "slice"]) | st.text(max_size=130))
            header[target][key] = draw(
                JSON
                | st.text()
                | st.sampled_from(["9" * 5000, "-1", "0", "1e9", "\u202e", "x" * 4097])
            )
        elif isinstance(header[target], dict):
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra", None]))
            if field is None:
                header[target] = draw(JSON)
            elif field == "dtype":
                header[target]["dtype"] = draw(DTYPES)
            else:
                header[target][field] = draw(
                    JSON | st.lists(HOSTILE_NUMBERS | st.integers(-8, 64), max_size=9)
                )
    text = json.dumps(header)
    attack = draw(st.sampled_from(TEXT_ATTACKS))
    depth = draw(st.integers(900, 20_000))
    if attack == "deep":
        text = "[" * depth + text + "]" * depth
    elif attack == "deep-in-metadata":
        text = text.replace(
            '"__metadata__": {', '"__metadata__": {"d": ' + "[" * depth + "]" * depth + ", ", 1
        )
    elif attack == "huge-int":
        text = text.replace("[", "[" + "7" * draw(st.integers(19, 6000)) + ", ", 1)
    elif attack == "duplicate":
        text = text.replace("{", '{"a/bias": {}, ', 1)
    elif attack == "nan":
        text = text.replace('"5"', "NaN", 1)
    elif attack == "surrogate":
        text = text.replace('"c-1"', '"\\udc80"', 1)
    encoded = text.encode()
    if draw(st.booleans()):  # the data as the header says, or any length
        data = draw(st.binary(min_size=position, max_size=position))
    else:
        data = draw(st.binary(max_size=96))
    return struct.pack("<Q", len(encoded)) + encoded + data


# --- uploads --------------------------------------------------------------------------------


@fuzz(1000)
@given(
    st.binary(max_size=512)
    | st.binary(min_size=8, max_size=64).map(lambda b: b"\x40" + b"\0" * 7 + b)
)
def test_parse_refuses_random_bytes(body: bytes) -> None:
    parse_or_refuse(body)


@fuzz(1000)
@given(mutated(VALID_BODY))
def test_parse_refuses_or_accepts_soundly_a_mutated_body(body: bytes) -> None:
    parse_or_refuse(body)
    agrees_with_the_reference_reader(body)


@fuzz(800)
@given(headers())
def test_parse_refuses_generated_headers(body: bytes) -> None:
    parse_or_refuse(body)
    agrees_with_the_reference_reader(body)


def test_generated_headers_reach_every_outcome() -> None:
    """The generator is not vacuous: decode accepts some bodies, refuses others with 400 and
    422, and some it accepts are whole updates."""
    seen: set[object] = set()

    @fuzz(400)
    @given(headers())
    def collect(body: bytes) -> None:
        try:
            weights.decode(body)
            seen.add("decoded")
        except weights.WeightsError as exc:
            seen.add(exc.status)
        try:
            uploads.parse(body, RECEIVE)
            seen.add("update")
        except uploads.BadUpdate:
            pass

    collect()
    assert {"decoded", 400, 422, "update"} <= seen, seen


# --- checkpoints ----------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def quiet() -> Iterator[None]:
    """Thousands of "skipping checkpoint" warnings would only slow the run (test_checkpoints
    checks them)."""
    logger = logging.getLogger("fedsim.checkpoints")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@pytest.fixture(scope="module")
def model_dir() -> Iterator[Path]:
    """Good versions 1 and 2; tests overwrite version 2's file."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder)
        checkpoints.save(path, 1, valid_tensors(), {"samples": 5, "updates": 1}, keep=5)
        checkpoints.save(
            path, 2, {k: v + 1 for k, v in valid_tensors().items()}, {"samples": 9}, keep=5
        )
        yield path


def checkpoint_bytes(model_dir: Path) -> bytes:
    return weights.encode(
        {k: v + 1 for k, v in valid_tensors().items()},
        {
            "samples": 9,
            "version": 2,
            "checksum": checkpoints.checksum({k: v + 1 for k, v in valid_tensors().items()}),
        },
    )


def read_or_refuse(path: Path) -> checkpoints.Checkpoint | None:
    try:
        return checkpoints.read(path)
    except (weights.WeightsError, OSError):
        return None


def falls_back(model_dir: Path) -> checkpoints.Checkpoint:
    """load_newest gives version 2 only when it reads whole and valid, else version 1."""
    ckpt = checkpoints.load_newest(model_dir)
    assert ckpt is not None and ckpt.version in (1, 2)
    if ckpt.version == 1:
        np.testing.assert_array_equal(ckpt.tensors["a/bias"], valid_tensors()["a/bias"])
    return ckpt


@fuzz(500)
@given(st.binary(max_size=512) | headers())
def test_read_refuses_random_files(model_dir: Path, body: bytes) -> None:
    path = checkpoints.path_for(model_dir, 2)
    path.write_bytes(body)
    read_or_refuse(path)
    falls_back(model_dir)


@fuzz(600)
@given(st.data())
def test_a_flipped_bit_is_refused_or_changes_no_tensor(
    model_dir: Path, data: st.DataObject
) -> None:
    good = checkpoint_bytes(model_dir)
    bit = data.draw(st.integers(0, 8 * len(good) - 1))
    damaged = bytearray(good)
    damaged[bit // 8] ^= 1 << (bit % 8)
    path = checkpoints.path_for(model_dir, 2)
    path.write_bytes(bytes(damaged))
    ckpt = read_or_refuse(path)
    header_end = 8 + struct.unpack("<Q", good[:8])[0]
    if bit // 8 >= header_end:
        assert ckpt is None, "a flipped bit in tensor data was not detected"
    if ckpt is not None:
        for name, tensor in valid_tensors().items():
            np.testing.assert_array_equal(ckpt.tensors[name], tensor + 1)
    assert falls_back(model_dir).version == (1 if ckpt is None else 2)


@fuzz(600)
@given(st.data())
def test_load_newest_falls_back_past_damaged_files(model_dir: Path, data: st.DataObject) -> None:
    body = data.draw(mutated(checkpoint_bytes(model_dir)))
    path = checkpoints.path_for(model_dir, 2)
    path.write_bytes(body)
    read_or_refuse(path)
    falls_back(model_dir)
