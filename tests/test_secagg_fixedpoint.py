"""Fixed-point encoding in Z_(2^64): exact within the step, and no overflow at the bound."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.pipeline.secagg import fixedpoint as fp


def modular_sum(words: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(words[0])
    for w in words:
        total += w
    return total


def test_a_weighted_mean_comes_back_within_the_step() -> None:
    rng = np.random.default_rng(3)
    xs = [rng.normal(0, 0.05, 500).astype(np.float32) for _ in range(20)]
    ns = [int(n) for n in rng.integers(1, 3000, 20)]
    mean = fp.decode(modular_sum([fp.encode(x, n) for x, n in zip(xs, ns, strict=True)]), sum(ns))
    plain = sum(n * x.astype(np.float64) for x, n in zip(xs, ns, strict=True)) / sum(ns)
    error = np.abs(mean - plain).max()
    assert error <= fp.step(20, sum(ns)) * (1 + 1e-9) + 1e-15
    assert error > 0 or np.array_equal(mean, plain)


def test_the_worst_case_sum_does_not_overflow() -> None:
    """Counts summing to MAX_TOTAL, every weight at +B (then -B): the decoded mean is +-B."""
    ns = [fp.MAX_TOTAL // 4] * 4
    for sign in (1.0, -1.0):
        x = np.full(8, sign * fp.CLIP, np.float32)
        total = modular_sum([fp.encode(x, n) for n in ns])
        assert np.all(fp.decode(total, sum(ns)) == sign * fp.CLIP)
        bound = fp.CLIP * fp.SCALE * fp.MAX_TOTAL
        assert bound < 2**63  # the docstring's 2^60 < 2^63
        assert np.all(np.abs(total.view(np.int64).astype(np.float64)) == bound)


def test_one_more_count_than_the_bound_is_refused() -> None:
    with pytest.raises(ValueError, match=r"1\.\.65536"):
        fp.encode(np.zeros(2, np.float32), fp.MAX_TOTAL + 1)
    with pytest.raises(ValueError, match=r"1\.\.65536"):
        fp.decode(np.zeros(2, np.uint64), fp.MAX_TOTAL + 1)
    with pytest.raises(ValueError, match="integer"):
        fp.encode(np.zeros(2, np.float32), 1.5)  # type: ignore[arg-type]


def test_values_beyond_the_clip_are_clipped() -> None:
    x = np.array([1e9, -1e9, 0.25], np.float32)
    assert fp.decode(fp.encode(x, 3), 3).tolist() == [fp.CLIP, -fp.CLIP, 0.25]


def test_encoding_is_uint64_twos_complement() -> None:
    words = fp.encode(np.array([-1.0, 1.0], np.float32), 1)
    assert words.dtype == np.uint64
    assert int(words[0]) == 2**64 - 2**32 and int(words[1]) == 2**32
