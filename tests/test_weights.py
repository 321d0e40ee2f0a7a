"""The safetensors codec and validation of tensors against a model's layout."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from fedsim import models, weights

LAYOUT = (("a/kernel", (2, 3)), ("a/bias", (3,)))


def tensors() -> dict[str, np.ndarray]:
    return {
        "a/kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
        "a/bias": np.array([0.5, -1.0, 2.0], dtype=np.float32),
    }


def test_round_trip_keeps_tensors_and_metadata() -> None:
    data = weights.encode(tensors(), {"version": 3, "client_id": "client-1"})
    decoded, metadata = weights.decode(data)
    assert metadata == {"version": "3", "client_id": "client-1"}
    for name, tensor in tensors().items():
        np.testing.assert_array_equal(decoded[name], tensor)
        assert decoded[name].dtype == np.float32


def test_mlp_update_is_within_one_percent_of_its_float32_size() -> None:
    raw = 4 * models.parameter_count("mlp")
    assert raw == 796_840
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
    assert raw < size <= raw * 1.01


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
)
def test_unreadable_bodies_are_400(body: bytes, reason: str) -> None:
    with pytest.raises(weights.WeightsError, match=reason) as info:
        weights.decode(body)
    assert info.value.status == 400


def test_tensor_data_shorter_than_header_says_is_400() -> None:
    data = weights.encode(tensors(), {})
    with pytest.raises(weights.WeightsError) as info:
        weights.decode(data[:-4])
    assert info.value.status == 400


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
