"""Compressed updates (pipeline/compress.py): each codec's round trip and bounds, top-k with
error feedback, the stage on both sides, the aggregator's re-checks, and the settings."""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim import config, models
from fedsim.pipeline import compress
from fedsim.pipeline.base import Outgoing, Rejected, Upload
from fedsim.pipeline.residuals import Residuals
from fedsim.settings import ConfigError

LAYOUT = models.SHAPES["mlp"]


def delta(seed: int = 0, scale: float = 0.01) -> dict[str, np.ndarray]:
    """A delta of the mlp's layout, of a trained update's scale (seeded normal values)."""
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s) * scale).astype(np.float32) for n, s in LAYOUT}


def dense(sent: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    return {n: compress.topk_decode(i, v, dict(LAYOUT)[n]) for n, (i, v) in sent.items()}


# --- codecs ------------------------------------------------------------------------------


def test_fp16_round_trip_within_half_precision() -> None:
    x = delta(1)["hidden1/kernel"]
    back = compress.fp16_decode(compress.fp16_encode(x))
    assert back.dtype == np.float32
    # Relative error 2^-11 for normal numbers; 2^-25 absolute below fp16's normal range.
    assert (np.abs(x - back) <= np.abs(x) * 2.0**-11 + 2.0**-25).all()


def test_int8_round_trip_within_half_a_step() -> None:
    x = delta(2)["hidden1/kernel"]
    q, s = compress.int8_encode(x)
    assert q.dtype == np.int8 and s == np.float32(np.abs(x).max() / 127)
    assert q.min() >= -127 and np.abs(q).max() == 127  # symmetric: -128 is never used
    back = compress.int8_decode(q, s)
    assert np.abs(x - back).max() <= s / 2 * (1 + 1e-6)


def test_int8_of_zeros_is_zeros_with_scale_zero() -> None:
    q, s = compress.int8_encode(np.zeros((3, 4), np.float32))
    assert s == 0 and not q.any()
    assert not compress.int8_decode(q, s).any()


def test_int8_stochastic_rounding_is_within_a_step_and_unbiased() -> None:
    x = np.full(20_000, 0.3, np.float32)
    x[0] = 1.0  # the scale: s = 1 / 127, so 0.3 lies between two codes
    q, s = compress.int8_encode(x, np.random.default_rng(5))
    back = compress.int8_decode(q, s)
    assert np.abs(x - back).max() <= s * (1 + 1e-6)
    assert set(np.unique(q[1:])) == {math.floor(0.3 * 127), math.ceil(0.3 * 127)}
    # The mean of 20,000 draws: std of one draw <= s / 2, so 6 standard errors is 0.021 s.
    assert abs(back[1:].mean() - 0.3) < 6 * (s / 2) / math.sqrt(19_999)


def test_kept_is_the_ceiling_of_the_fraction_at_least_one() -> None:
    assert compress.kept(0.01, 200) == 2  # not 3: 0.01 x 200 is 2.0000000000000004 in floats
    assert compress.kept(0.01, 201) == 3
    assert compress.kept(0.01, 10) == 1
    assert compress.kept(1.0, 10) == 10


def test_topk_keeps_exactly_the_k_largest_magnitudes() -> None:
    x = delta(3)["hidden2/kernel"]
    idx, values = compress.topk_encode(x, 0.01)
    k = compress.kept(0.01, x.size)
    assert idx.dtype == np.int32 and len(idx) == k == len(np.unique(idx))
    assert (np.diff(idx) > 0).all()  # ascending: the same delta gives the same bytes
    assert values.dtype == np.float16
    assert np.array_equal(values, x.ravel()[idx].astype(np.float16))
    threshold = np.sort(np.abs(x).ravel())[-k]
    assert (np.abs(x.ravel()[idx]) >= threshold).all()
    left = np.delete(np.abs(x).ravel(), idx)
    assert left.max() <= threshold
    back = compress.topk_decode(idx, values, x.shape)
    assert back.dtype == np.float32 and np.count_nonzero(back) == k
    assert np.array_equal(back.ravel()[idx], values.astype(np.float32))


def wire_round_trip(idx: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gaps, wire_values = compress.gaps_encode(idx, values)
    assert gaps.dtype == np.uint16 and wire_values.dtype == np.float16
    back = compress.gaps_decode(gaps)
    assert (np.diff(back) >= 1).all()  # strictly increasing: fillers never repeat an index
    assert set(idx.tolist()) <= set(back.tolist())
    fillers = np.isin(back, idx, invert=True)
    assert not wire_values[fillers].any()  # a filler adds nothing
    np.testing.assert_array_equal(wire_values[~fillers], values.astype(np.float16))
    return gaps, back


def test_the_gaps_of_near_indices_need_no_filler() -> None:
    idx, values = compress.topk_encode(delta(5)["hidden1/kernel"], 0.02)
    gaps, back = wire_round_trip(idx, values)
    assert gaps.size == idx.size and np.array_equal(back, idx)
    assert gaps[0] == idx[0] and np.array_equal(gaps[1:], np.diff(idx))


def test_long_gaps_are_bridged_by_fillers_of_value_zero() -> None:
    # 200,000 entries, 5 kept: gaps of 0, 65535 (the largest without a filler), 1,
    # 131070 (a filler, then 65535) and 3393.
    idx = np.array([0, 65535, 65536, 65536 + 131070, 199_999], np.int64)
    values = np.array([0.5, -0.25, 0.125, 2.0, -1.0], np.float32)
    gaps, back = wire_round_trip(idx, values)
    assert gaps.tolist() == [0, 65535, 1, 65535, 65535, 3393]
    assert back.tolist() == [0, 65535, 65536, 131071, 196606, 199_999]
    assert gaps.size - idx.size <= 200_000 // compress.MAX_GAP
    # The worst case: one entry at the end needs size // 65535 fillers, the bound checked.
    gaps, _ = wire_round_trip(np.array([199_999]), np.ones(1, np.float32))
    assert gaps.size == 1 + 200_000 // compress.MAX_GAP
    x = np.zeros(200_000, np.float32)
    x[idx] = values
    wire = {"w:index": compress.gaps_encode(idx, values)[0], "w:value": gaps_values(idx, values)}
    got = compress.decode("topk", wire, (("w", (200_000,)),), 5 / 200_000)
    np.testing.assert_array_equal(got["w"], x)


def gaps_values(idx: np.ndarray, values: np.ndarray) -> np.ndarray:
    return compress.gaps_encode(idx, values)[1]


def test_an_update_body_at_two_percent_is_over_30_times_smaller_than_float32() -> None:
    from fedsim import weights

    meta = {"client_id": "client-1", "update_id": "r1.c1", "base_version": "0",
            "num_samples": "600", "loss": "0.25", "accuracy": "0.9"}  # fmt: skip
    d = delta(6)
    f32 = weights.encode(d, meta)
    wire = compress.encode("topk", d, 0.02)
    body = weights.encode(wire, {**meta, "codec": "topk16"}, wire=True)
    entries = sum(t.size for key, t in wire.items() if key.endswith(compress.INDEX))
    kept = sum(compress.kept(0.02, math.prod(shape)) for _, shape in LAYOUT)
    assert kept <= entries <= kept + sum(math.prod(s) // compress.MAX_GAP for _, s in LAYOUT)
    header = int.from_bytes(body[:8], "little")
    assert len(body) - 8 - header == 4 * entries  # 2 bytes of gap and 2 of value an entry
    assert len(f32) / len(body) >= 30, (len(f32), len(body))


def test_error_feedback_sends_every_delta_in_the_end() -> None:
    deltas = [delta(seed) for seed in range(6)]
    residual, sent_sum = None, {n: np.zeros(s, np.float32) for n, s in LAYOUT}
    for d in deltas:
        before = residual
        sent, residual = compress.feedback(d, residual, 0.01)
        for name, t in dense(sent).items():
            acc = d[name] + (before[name] if before else np.float32(0))
            # Each step loses nothing, bit for bit: sent (as fp16) + e' == acc in float32.
            assert np.array_equal(t + residual[name], acc)
            assert np.count_nonzero(residual[name].ravel()[sent[name][0]]) > 0  # rounding kept
            sent_sum[name] += t
    for name, _ in LAYOUT:
        total = np.sum([d[name] for d in deltas], axis=0)
        np.testing.assert_allclose(sent_sum[name] + residual[name], total, atol=1e-6)


def test_a_value_beyond_half_precision_is_sent_in_parts() -> None:
    # Infinity would have the update refused, and the residual would send it again: the
    # worker sends 65504, the largest float16, and keeps the rest for the next update.
    d = {n: np.zeros(s, np.float32) for n, s in LAYOUT}
    d["output/bias"][3] = -1e5
    sent, residual = compress.feedback(d, None, 0.01)
    idx, values = sent["output/bias"]
    assert idx.tolist() == [3] and values.tolist() == [-65504.0]
    assert residual["output/bias"][3] == np.float32(-1e5 + 65504)  # exact
    zero = {n: np.zeros(s, np.float32) for n, s in LAYOUT}
    sent, residual = compress.feedback(zero, residual, 0.01)
    assert sent["output/bias"][1].tolist() == [-34496.0] and not residual["output/bias"].any()
    stage = compress.Compress("topk", LAYOUT, fraction=0.01)
    got = stage.decode(compress.wire_topk(sent), Upload({"codec": "topk16"}, 0, lambda v: zero))
    assert got["output/bias"][3] == -34496.0


# --- the stage: worker side encodes the delta, aggregator side decodes onto the base -----


def base_model() -> dict[str, np.ndarray]:
    return {n: t + np.float32(0.5) for n, t in delta(9, 0.1).items()}


def outgoing(d: dict[str, np.ndarray], task: dict | None = None) -> Outgoing:
    base = base_model()
    return Outgoing(base, {n: base[n] + d[n] for n in d}, task or {})


def upload_of(out: Outgoing, version: int = 0) -> Upload:
    return Upload(dict(out.meta), version, lambda v: base_model() if v == version else None)


@pytest.mark.parametrize(("codec", "bound"), [("fp16", 2e-5), ("int8", 3e-4), ("topk", None)])
def test_the_aggregator_gets_back_the_weights_the_worker_trained(tmp_path, codec, bound) -> None:
    stage = compress.Compress(codec, LAYOUT, fraction=0.01, residuals=Residuals(tmp_path))
    d = delta(4)
    task = {"client": "client-1", "id": "r1.c1", "run": "ab12", "base_version": 0}
    sent = stage.worker(outgoing(d, task))
    assert sent.meta == {"codec": compress.WIRE_NAMES[codec]}
    got = stage.decode(sent.tensors, upload_of(sent))
    base = base_model()
    for name, _ in LAYOUT:
        assert got[name].dtype == np.float32
        if bound is not None:
            assert np.abs(got[name] - (base[name] + d[name])).max() <= bound
        else:  # top-k: exactly the kept entries of the delta, in half precision, moved it
            moved = np.flatnonzero(got[name] != base[name])
            assert len(moved) <= compress.kept(0.01, d[name].size)
            sent_delta = outgoing(d).delta()[name]  # (base + d) - base, as the worker took it
            half = sent_delta.astype(np.float16).astype(np.float32)
            assert np.array_equal(got[name].ravel()[moved], (base[name] + half).ravel()[moved])


def test_the_aggregator_refuses_another_codec_or_none() -> None:
    stage = compress.Compress("int8", LAYOUT)
    wire = compress.encode("int8", delta())
    for meta, shown in (({"codec": "fp16"}, "'fp16'"), ({}, "none")):
        with pytest.raises(
            Rejected, match=f"COMPRESSION=int8 updates, the upload says codec {shown}"
        ):
            stage.decode(wire, Upload(meta, 0, lambda v: base_model()))


def test_the_earlier_topk_form_is_refused_by_name() -> None:
    stage = compress.Compress("topk", LAYOUT, fraction=0.01)
    assert {"U16", "F16", "I32"} == stage.dtypes  # I32 reaches the stage to be named
    earlier = {}
    for name, shape in LAYOUT:  # int32 indices, float32 values, as workers sent them before
        idx = np.arange(compress.kept(0.01, math.prod(shape)), dtype=np.int32)
        earlier[name + ":index"], earlier[name + ":value"] = idx, np.ones(idx.size, np.float32)
    with pytest.raises(Rejected, match="says codec 'topk': the earlier top-k form") as caught:
        stage.decode(earlier, Upload({"codec": "topk"}, 0, lambda v: base_model()))
    assert "COMPRESSION=topk updates (codec topk16)" in caught.value.reason
    with pytest.raises(Rejected, match="must be 1-D uint16 gaps, is int32"):
        stage.decode(earlier, Upload({"codec": "topk16"}, 0, lambda v: base_model()))


def test_a_base_no_longer_kept_is_a_409() -> None:
    stage = compress.Compress("fp16", LAYOUT)
    wire = compress.encode("fp16", delta())
    with pytest.raises(Rejected, match="base version 3 is no longer kept") as caught:
        stage.decode(wire, Upload({"codec": "fp16"}, 3, lambda v: None))
    assert caught.value.status == 409


def int8_wire(**changes: np.ndarray) -> dict[str, np.ndarray]:
    wire = compress.encode("int8", delta())
    wire.update(changes)
    return {k: v for k, v in wire.items() if v is not None}


def topk_wire(**changes: np.ndarray) -> dict[str, np.ndarray]:
    wire = compress.encode("topk", delta(), 0.01)
    wire.update(changes)
    return wire


IDX, VAL = "output/bias:index", "output/bias:value"  # output/bias: 10 entries, k = 1
H_IDX, H_VAL = "hidden1/bias:index", "hidden1/bias:value"  # 200 entries, k = 2


def u16(*gaps: int) -> np.ndarray:
    return np.array(gaps, np.int64).astype(np.uint16)  # a negative step wraps, as in C


def f16(*values: float) -> np.ndarray:
    return np.array(values, np.float16)


@pytest.mark.parametrize(
    ("codec", "wire", "tensor", "detail"),
    [
        ("fp16", {**compress.encode("fp16", delta()), "output/bias": np.zeros(10, np.float32)},
         "output/bias", "is float32, expected float16"),
        ("fp16", {**compress.encode("fp16", delta()), "output/bias": np.full(10, np.inf, np.float16)},
         "output/bias", "NaN or infinity"),
        ("fp16", {**compress.encode("fp16", delta()), "output/bias": np.zeros(11, np.float16)},
         "output/bias", "shape (11,)"),
        ("int8", int8_wire(**{"output/bias:scale": np.float32(np.nan)}),
         "output/bias:scale", "a scale must be in"),
        ("int8", int8_wire(**{"output/bias:scale": np.float32(-1)}),
         "output/bias:scale", "a scale must be in"),
        ("int8", int8_wire(**{"output/bias:scale": np.float32(1e5)}),
         "output/bias:scale", "a scale must be in"),
        ("int8", int8_wire(**{"output/bias:scale": np.zeros(1, np.float32)}),
         "output/bias:scale", "shape (1,)"),
        ("int8", int8_wire(**{"output/bias": np.full(10, -128, np.int8)}),
         "output/bias", "holds -128"),
        ("int8", int8_wire(**{"output/bias": np.zeros(10, np.float32)}),
         "output/bias", "is float32, expected int8"),
        ("topk", topk_wire(**{IDX: u16(10)}), IDX, "reaches index 10, past its 10 entries"),
        # Indices 5 then 3: a step of -2 wraps to a gap of 65534 and lands past the end.
        ("topk", topk_wire(**{H_IDX: u16(5, 3 - 5), H_VAL: f16(1, 1)}), H_IDX,
         "reaches index 65539, past its 200 entries"),
        ("topk", topk_wire(**{H_IDX: u16(5, 0), H_VAL: f16(1, 1)}), H_IDX,
         "has a gap of 0 at entry 1: indices must strictly increase"),
        ("topk", topk_wire(**{IDX: u16(2, 1), VAL: f16(1, 1)}), IDX,
         "holds 2 entries, at most 1 of 10 (1 kept and 0 fillers)"),
        ("topk", topk_wire(**{"hidden1/kernel:index": u16(*[1] * 1571),
                              "hidden1/kernel:value": f16(*[1] * 1571)}), "hidden1/kernel:index",
         "holds 1571 entries, at most 1570 of 156800 (1568 kept and 2 fillers)"),
        ("topk", topk_wire(**{VAL: f16(np.inf)}), VAL, "non-finite"),
        ("topk", topk_wire(**{VAL: f16(np.nan)}), VAL, "non-finite"),
        ("topk", topk_wire(**{VAL: f16(1, 1)}), VAL, "float16 of shape (1,) like its gaps"),
        ("topk", topk_wire(**{VAL: np.ones(1, np.float32)}), VAL, "must be float16"),
        ("topk", topk_wire(**{IDX: np.array([1], np.int32)}), IDX, "1-D uint16 gaps, is int32"),
        ("topk", topk_wire(**{IDX: np.array([[1]], np.uint16)}), IDX, "1-D uint16 gaps"),
    ],
    ids=["fp16-dtype", "fp16-inf", "fp16-shape", "scale-nan", "scale-negative", "scale-huge",
         "scale-shape", "code-128", "int8-dtype", "index-past-end", "decreasing", "zero-gap",
         "too-many", "too-many-fillers", "value-inf", "value-nan", "lengths", "value-dtype",
         "index-dtype", "index-2d"],
)  # fmt: skip
def test_a_breach_of_the_codec_is_refused_naming_the_tensor(codec, wire, tensor, detail) -> None:
    stage = compress.Compress(codec, LAYOUT, fraction=0.01)
    said = {"codec": compress.WIRE_NAMES[codec]}
    with pytest.raises(Rejected, match=re.escape(detail)) as caught:
        stage.decode(wire, Upload(said, 0, lambda v: base_model()))
    assert caught.value.tensor == tensor and caught.value.status == 422


@pytest.mark.parametrize("codec", ["fp16", "int8", "topk"])
def test_missing_or_unexpected_tensors_are_refused(codec) -> None:
    stage = compress.Compress(codec, LAYOUT, fraction=0.01)
    wire = compress.encode(codec, delta(), 0.01)
    first = sorted(wire)[0]
    for broken in ({k: v for k, v in wire.items() if k != first}, {**wire, "extra": wire[first]}):
        with pytest.raises(Rejected, match=f"wrong tensor names for COMPRESSION={codec}"):
            said = {"codec": compress.WIRE_NAMES[codec]}
            stage.decode(broken, Upload(said, 0, lambda v: base_model()))


# --- error feedback on the worker: the residual follows the logical client ---------------


def push(stage: compress.Compress, d: dict, task_id: str, base_version: int, client="client-7"):
    task = {"client": client, "id": task_id, "run": "5eed", "base_version": base_version}
    wire = stage.worker(outgoing(d, task)).tensors
    return dense(
        {n: (compress.gaps_decode(wire[n + ":index"]), wire[n + ":value"]) for n, _ in LAYOUT}
    )


def test_the_residual_survives_a_restart_and_moves_to_another_worker(tmp_path: Path) -> None:
    # Three Compress stages on one folder: worker A, worker B, and A again after a restart.
    a, b, a_again = (
        compress.Compress("topk", LAYOUT, fraction=0.01, residuals=Residuals(tmp_path))
        for _ in range(3)
    )
    deltas = [delta(seed) for seed in range(4)]
    sent = [
        push(a, deltas[0], "r1.c7", 0),
        push(b, deltas[1], "r2.c7", 1),
        push(a_again, deltas[2], "r3.c7", 2),
        push(b, deltas[3], "r4.c7", 3),
    ]
    final = Residuals(tmp_path).load("client-7", "5eed", "r5.c7", 4, LAYOUT)
    assert final is not None
    for name, _ in LAYOUT:
        total = np.sum([d[name] for d in deltas], axis=0)
        np.testing.assert_allclose(sum(s[name] for s in sent) + final[name], total, atol=1e-6)


def test_a_task_trained_again_keeps_what_its_first_attempt_sent(tmp_path: Path) -> None:
    # The first attempt of r2 was never applied (its lease expired): its top-k goes back in.
    a = compress.Compress("topk", LAYOUT, fraction=0.01, residuals=Residuals(tmp_path))
    b = compress.Compress("topk", LAYOUT, fraction=0.01, residuals=Residuals(tmp_path))
    d1, d2, d2_again = delta(1), delta(2), delta(3)
    s1 = push(a, d1, "r1.c7", 0)
    push(a, d2, "r2.c7", 1)  # lost
    s2 = push(b, d2_again, "r2.c7", 1)
    final = Residuals(tmp_path).load("client-7", "5eed", "r3.c7", 2, LAYOUT)
    for name, _ in LAYOUT:
        computed = d1[name] + d2[name] + d2_again[name]  # the lost attempt's delta is kept too
        np.testing.assert_allclose(s1[name] + s2[name] + final[name], computed, atol=1e-6)


def test_compress_refuses_with_secure_aggregation() -> None:
    with pytest.raises(ConfigError, match="invalid setting COMPRESSION='topk': SECAGG masks"):
        compress.check_settings(SimpleNamespace(compression="topk", secagg=True))
    compress.check_settings(SimpleNamespace(compression="none", secagg=True))


# --- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "detail"),
    [
        ("COMPRESSION", "zip", "one of none, fp16, int8, topk"),
        ("COMPRESSION_TOPK", "0", "a number > 0 and <= 1"),
        ("COMPRESSION_TOPK", "1.5", "a number > 0 and <= 1"),
        ("COMPRESSION_TOPK", "nan", "a number > 0 and <= 1"),
        ("COMPRESSION_DOWN", "int8", "one of none, fp16"),
    ],
)
def test_a_bad_compression_setting_is_one_line_naming_the_key(make_settings, key, value, detail):
    with pytest.raises(config.ConfigError) as caught:
        make_settings(**{key: value})
    message = str(caught.value)
    assert message.startswith(f"invalid setting {key}=") and detail in message
    assert "\n" not in message


def test_the_settings_offer_exactly_the_codecs() -> None:
    from fedsim import settings_table

    assert settings_table.CODECS == compress.CODECS


def test_the_stage_runs_only_when_compression_is_on(make_settings) -> None:
    from fedsim import pipeline

    assert "compress" not in pipeline.build(make_settings()).names
    built = pipeline.build(make_settings(COMPRESSION="topk", COMPRESSION_TOPK="0.05"))
    stage = built.stages[built.names.index("compress")]
    assert (stage.codec, stage.fraction) == ("topk", 0.05)
    assert built.dtypes == {"F32", "U16", "F16", "I32"} and built.wants_base


# --- the gaps, for any indices (Hypothesis, derandomized) ------------------------------------


@st.composite
def kept_entries(draw) -> tuple[int, np.ndarray, np.ndarray]:
    """A tensor's size (up to 300,000: four fillers' worth) and sorted unique kept indices
    with float16-exact values, spread anywhere (bunched, at both ends, far apart)."""
    size = draw(st.integers(1, 300_000))
    idx = draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=40, unique=True))
    values = draw(st.lists(st.sampled_from([0.5, -1.0, 2.0**-14, 65504.0]), min_size=len(idx),
                           max_size=len(idx)))  # fmt: skip
    return size, np.sort(np.array(idx, np.int64)), np.array(values, np.float32)


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(kept_entries())
def test_any_kept_indices_come_back_through_the_aggregators_checks(entries) -> None:
    size, idx, values = entries
    order = np.argsort(idx)
    x = np.zeros(size, np.float32)
    x[idx] = values[order]
    gaps, wire_values = compress.gaps_encode(idx, values[order])
    assert gaps.size <= idx.size + size // compress.MAX_GAP
    fraction = idx.size / size  # k = the entries kept, so the bound is as tight as it gets
    got = compress.decode(
        "topk", {"w:index": gaps, "w:value": wire_values}, (("w", (size,)),), fraction
    )
    np.testing.assert_array_equal(got["w"], x)


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(st.lists(st.integers(0, 65535), max_size=12), st.integers(1, 200_000))
def test_any_gaps_are_refused_or_decode_inside_the_tensor(raw: list[int], size: int) -> None:
    gaps = np.array(raw, np.uint16)
    wire = {"w:index": gaps, "w:value": np.ones(gaps.size, np.float16)}
    try:
        got = compress.decode("topk", wire, (("w", (size,)),), 1.0)
    except Rejected as exc:
        assert exc.tensor == "w:index" and exc.status == 422
        return
    assert np.count_nonzero(got["w"]) == gaps.size  # one entry each, none lost or repeated
