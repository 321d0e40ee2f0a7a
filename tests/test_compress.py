"""Compressed updates (pipeline/compress.py): each codec's round trip and bounds, top-k with
error feedback, the stage on both sides, the aggregator's re-checks, and the settings."""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

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
    assert np.array_equal(values, x.ravel()[idx])
    threshold = np.sort(np.abs(x).ravel())[-k]
    assert (np.abs(values) >= threshold).all()
    left = np.delete(np.abs(x).ravel(), idx)
    assert left.max() <= threshold
    back = compress.topk_decode(idx, values, x.shape)
    assert np.count_nonzero(back) == k and np.array_equal(back.ravel()[idx], values)


def test_error_feedback_sends_every_delta_in_the_end() -> None:
    deltas = [delta(seed) for seed in range(6)]
    residual, sent_sum = None, {n: np.zeros(s, np.float32) for n, s in LAYOUT}
    for d in deltas:
        sent, residual = compress.feedback(d, residual, 0.01)
        for name, t in dense(sent).items():
            sent_sum[name] += t
    for name, _ in LAYOUT:
        total = np.sum([d[name] for d in deltas], axis=0)
        np.testing.assert_allclose(sent_sum[name] + residual[name], total, atol=1e-6)


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
    assert sent.meta == {"codec": codec}
    got = stage.decode(sent.tensors, upload_of(sent))
    base = base_model()
    for name, _ in LAYOUT:
        assert got[name].dtype == np.float32
        if bound is not None:
            assert np.abs(got[name] - (base[name] + d[name])).max() <= bound
        else:  # top-k: exactly the kept entries of the delta moved the base
            moved = np.flatnonzero(got[name] != base[name])
            assert len(moved) <= compress.kept(0.01, d[name].size)
            np.testing.assert_allclose(
                got[name].ravel()[moved], (base[name] + d[name]).ravel()[moved], rtol=1e-6
            )


def test_the_aggregator_refuses_another_codec_or_none() -> None:
    stage = compress.Compress("int8", LAYOUT)
    wire = compress.encode("int8", delta())
    for meta, shown in (({"codec": "fp16"}, "'fp16'"), ({}, "none")):
        with pytest.raises(
            Rejected, match=f"COMPRESSION=int8 updates, the upload says codec {shown}"
        ):
            stage.decode(wire, Upload(meta, 0, lambda v: base_model()))


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
        ("topk", topk_wire(**{IDX: np.array([10], np.int32)}), IDX, "outside [0, 10)"),
        ("topk", topk_wire(**{IDX: np.array([-1], np.int32)}), IDX, "outside [0, 10)"),
        ("topk", topk_wire(**{IDX: np.array([2, 2], np.int32), VAL: np.ones(2, np.float32)}),
         IDX, "keeps 2 entries, at most 1"),
        ("topk", topk_wire(**{"hidden1/bias:index": np.array([3, 3], np.int32),
                              "hidden1/bias:value": np.ones(2, np.float32)}),
         "hidden1/bias:index", "repeats an index"),
        ("topk", topk_wire(**{VAL: np.array([np.nan], np.float32)}), VAL, "non-finite"),
        ("topk", topk_wire(**{VAL: np.ones(2, np.float32)}), VAL, "like its indices"),
        ("topk", topk_wire(**{IDX: np.array([1.0], np.float32)}), IDX, "1-D int32"),
    ],
    ids=["fp16-dtype", "fp16-inf", "fp16-shape", "scale-nan", "scale-negative", "scale-huge",
         "scale-shape", "code-128", "int8-dtype", "index-high", "index-negative", "too-many",
         "repeated", "value-nan", "lengths", "index-dtype"],
)  # fmt: skip
def test_a_breach_of_the_codec_is_refused_naming_the_tensor(codec, wire, tensor, detail) -> None:
    stage = compress.Compress(codec, LAYOUT, fraction=0.01)
    with pytest.raises(Rejected, match=re.escape(detail)) as caught:
        stage.decode(wire, Upload({"codec": codec}, 0, lambda v: base_model()))
    assert caught.value.tensor == tensor and caught.value.status == 422


@pytest.mark.parametrize("codec", ["fp16", "int8", "topk"])
def test_missing_or_unexpected_tensors_are_refused(codec) -> None:
    stage = compress.Compress(codec, LAYOUT, fraction=0.01)
    wire = compress.encode(codec, delta(), 0.01)
    first = sorted(wire)[0]
    for broken in ({k: v for k, v in wire.items() if k != first}, {**wire, "extra": wire[first]}):
        with pytest.raises(Rejected, match=f"wrong tensor names for COMPRESSION={codec}"):
            stage.decode(broken, Upload({"codec": codec}, 0, lambda v: base_model()))


# --- error feedback on the worker: the residual follows the logical client ---------------


def push(stage: compress.Compress, d: dict, task_id: str, base_version: int, client="client-7"):
    task = {"client": client, "id": task_id, "run": "5eed", "base_version": base_version}
    wire = stage.worker(outgoing(d, task)).tensors
    return dense({n: (wire[n + ":index"], wire[n + ":value"]) for n, _ in LAYOUT})


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
    assert built.dtypes == {"F32", "I32"} and built.wants_base
