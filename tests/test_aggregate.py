"""The aggregation math (strategies/aggregate.py) on tiny hand-worked arrays."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.aggregator.strategies import aggregate
from fedsim.aggregator.strategies.aggregate import (
    adagrad_moment,
    adam_moment,
    adaptive_step,
    coordinate_median,
    fedasync_mix,
    fedbuff_weight,
    first_moment,
    krum_scores,
    krum_select,
    momentum,
    polynomial_staleness,
    pseudo_gradient,
    squared_distances,
    trim_count,
    trimmed_mean,
    weighted_mean,
    weighted_merge,
    yogi_moment,
)


def w(*values: float) -> dict[str, np.ndarray]:
    return {"x": np.array(values, dtype=np.float32)}


def column(*values: float) -> list[dict[str, np.ndarray]]:
    """One single-value model per value."""
    return [w(v) for v in values]


# --- means ----------------------------------------------------------------------------


def test_weighted_merge_by_hand() -> None:
    # Prepare: 2 samples aggregated into [1, 2]; a client trained on 1 sample gives [4, 8].
    # Execute
    out = weighted_merge(w(1, 2), w(4, 8), a=2, b=1)
    # Assert: (2*1 + 1*4)/3 = 2, (2*2 + 1*8)/3 = 4.
    np.testing.assert_allclose(out["x"], [2.0, 4.0], rtol=1e-6)
    assert out["x"].dtype == np.float32


def test_weighted_merge_first_update_replaces_the_model() -> None:
    # a = 0: nothing aggregated yet, so the client's weights are taken whole.
    out = weighted_merge(w(5, -5), w(0.25, 3), a=0, b=10)
    np.testing.assert_array_equal(out["x"], [0.25, 3.0])


def test_weighted_merge_rejects_nonpositive_b() -> None:
    with pytest.raises(ValueError, match="b > 0"):
        weighted_merge(w(1), w(2), a=1, b=0)


def test_weighted_mean_by_hand() -> None:
    # Prepare: n_1 = 1 with [0, 3], n_2 = 3 with [4, 7]; n = 4.
    # Execute
    out = weighted_mean([w(0, 3), w(4, 7)], [1, 3])
    # Assert: (1*0 + 3*4)/4 = 3, (1*3 + 3*7)/4 = 6.
    np.testing.assert_allclose(out["x"], [3.0, 6.0], rtol=1e-7)
    assert out["x"].dtype == np.float32


def test_weighted_mean_needs_models_and_matching_counts() -> None:
    with pytest.raises(ValueError, match="no models"):
        weighted_mean([], [])
    with pytest.raises(ValueError, match="2 models but 1 counts"):
        weighted_mean([w(1), w(2)], [1])
    with pytest.raises(ValueError, match="positive"):
        weighted_mean([w(1), w(2)], [1, 0])


def test_weighted_mean_does_not_depend_on_the_order_of_the_clients() -> None:
    rng = np.random.default_rng(3)
    models = [{"x": rng.normal(size=1000).astype(np.float32)} for _ in range(7)]
    counts = [int(c) for c in rng.integers(1, 1000, size=7)]
    forward = weighted_mean(models, counts)
    backward = weighted_mean(models[::-1], counts[::-1])
    np.testing.assert_array_equal(forward["x"], backward["x"])


# --- staleness ------------------------------------------------------------------------


def test_polynomial_staleness_by_hand() -> None:
    # Fresh (t = tau): s = 1; t - tau = 3, a = 0.5: 4 ** -0.5 = 1/2; a = 0: always 1.
    assert polynomial_staleness(5, 5, a=0.5) == 1.0
    assert polynomial_staleness(7, 4, a=0.5) == pytest.approx(0.5)
    assert polynomial_staleness(7, 4, a=1.0) == pytest.approx(0.25)
    assert polynomial_staleness(100, 0, a=0.0) == 1.0


def test_polynomial_staleness_base_ahead_counts_as_fresh() -> None:
    # A client that saw versions a resumed aggregator lost: tau > t.
    assert polynomial_staleness(3, 5, a=0.5) == 1.0


def test_polynomial_staleness_rejects_negative_a() -> None:
    with pytest.raises(ValueError, match="a >= 0"):
        polynomial_staleness(1, 0, a=-0.5)


def test_fedasync_mix_by_hand() -> None:
    # Prepare: x_{t-1} = [1, 2], x_new = [5, -2], alpha_t = 0.25.
    # Execute
    out = fedasync_mix(w(1, 2), w(5, -2), alpha_t=0.25)
    # Assert: 0.75*1 + 0.25*5 = 2, 0.75*2 + 0.25*(-2) = 1.
    np.testing.assert_allclose(out["x"], [2.0, 1.0], rtol=1e-6)
    assert out["x"].dtype == np.float32


@pytest.mark.parametrize("alpha_t", [0.0, -0.1, 1.5, float("nan")])
def test_fedasync_mix_rejects_a_rate_outside_0_1(alpha_t: float) -> None:
    with pytest.raises(ValueError, match="alpha_t"):
        fedasync_mix(w(1), w(2), alpha_t=alpha_t)


def test_fedbuff_weight_by_hand() -> None:
    # s(tau) = 1 / sqrt(1 + tau): 1 fresh, 1/2 three versions behind, 1/3 eight behind.
    assert fedbuff_weight(0) == 1.0
    assert fedbuff_weight(3) == pytest.approx(0.5)
    assert fedbuff_weight(8) == pytest.approx(1 / 3)
    assert fedbuff_weight(-2) == 1.0  # a base ahead of the current version counts as fresh
    # The same function as FedAsync's polynomial s with a = 1/2.
    for tau in range(20):
        assert fedbuff_weight(tau) == pytest.approx(polynomial_staleness(tau, 0, a=0.5))


# --- coordinate-wise ------------------------------------------------------------------


def test_coordinate_median_by_hand() -> None:
    # Coordinate 0: 1, 2, 100 -> 2; coordinate 1: 10, 20, -5 -> 10.
    out = coordinate_median([w(1, 10), w(2, 20), w(100, -5)])
    np.testing.assert_array_equal(out["x"], [2.0, 10.0])
    assert out["x"].dtype == np.float32


def test_coordinate_median_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    # 1, 3, 10, 20 -> (3 + 10) / 2 = 6.5
    out = coordinate_median(column(20, 1, 10, 3))
    np.testing.assert_array_equal(out["x"], [6.5])


@pytest.mark.parametrize(
    ("n", "beta", "k"), [(10, 0.1, 1), (9, 0.1, 0), (5, 0.2, 1), (100, 0.29, 29), (7, 0.49, 3)]
)
def test_trim_count_is_floor_beta_n(n: int, beta: float, k: int) -> None:
    assert trim_count(n, beta) == k


@pytest.mark.parametrize("beta", [0.5, -0.1, 0.7])
def test_trim_count_rejects_beta_outside_0_half(beta: float) -> None:
    with pytest.raises(ValueError, match=r"beta < 0\.5"):
        trim_count(10, beta)


def test_trimmed_mean_by_hand() -> None:
    # n = 5, beta = 0.2: k = 1 dropped at each end.
    # Coordinate 0: 1 2 3 4 100 -> mean(2, 3, 4) = 3; coordinate 1: -50 0 1 2 3 -> 1.
    models = [w(3, 2), w(100, -50), w(1, 0), w(4, 3), w(2, 1)]
    out = trimmed_mean(models, 0.2)
    np.testing.assert_allclose(out["x"], [3.0, 1.0], rtol=1e-7)


def test_trimmed_mean_that_trims_nothing_is_the_plain_mean() -> None:
    out = trimmed_mean(column(1, 2, 6), 0.1)  # floor(0.3) = 0
    np.testing.assert_allclose(out["x"], [3.0], rtol=1e-7)


def test_block_size_does_not_change_the_coordinatewise_results(monkeypatch) -> None:
    # Prepare: several tensors, and the same computations with blocks of 3 values.
    rng = np.random.default_rng(1)
    models = [
        {"a": rng.normal(size=(4, 5)).astype(np.float32), "b": rng.normal(size=7).astype("f4")}
        for _ in range(6)
    ]
    whole = (coordinate_median(models), trimmed_mean(models, 0.2), squared_distances(models))
    # Execute
    monkeypatch.setattr(aggregate, "BLOCK_VALUES", 3 * 6)
    blocked = (coordinate_median(models), trimmed_mean(models, 0.2), squared_distances(models))
    # Assert
    for name in ("a", "b"):
        np.testing.assert_array_equal(whole[0][name], blocked[0][name])
        np.testing.assert_array_equal(whole[1][name], blocked[1][name])
    np.testing.assert_allclose(whole[2], blocked[2], rtol=1e-12)


# --- Krum -----------------------------------------------------------------------------


def test_squared_distances_by_hand() -> None:
    # (0, 0), (3, 4), (6, 8): 25 between neighbours, 100 between the ends.
    out = squared_distances([w(0, 0), w(3, 4), w(6, 8)])
    np.testing.assert_allclose(out, [[0, 25, 100], [25, 0, 25], [100, 25, 0]], atol=1e-9)


def test_squared_distances_sum_over_tensors() -> None:
    a = {"x": np.array([0.0], "f4"), "y": np.array([[0.0, 0.0]], "f4")}
    b = {"x": np.array([1.0], "f4"), "y": np.array([[2.0, 2.0]], "f4")}
    # 1 + 4 + 4 = 9
    np.testing.assert_allclose(squared_distances([a, b]), [[0, 9], [9, 0]], atol=1e-9)


def test_krum_scores_by_hand() -> None:
    # Prepare: values 0 1 2 3 100, n = 5, f = 1: each sums its n - f - 2 = 2 closest.
    # 0: 1 + 4 = 5; 1: 1 + 1 = 2; 2: 1 + 1 = 2; 3: 1 + 4 = 5; 100: 97^2 + 98^2 = 19013.
    scores = krum_scores(column(0, 1, 2, 3, 100), f=1)
    np.testing.assert_allclose(scores, [5, 2, 2, 5, 19013], atol=1e-6)


def test_krum_select_lowest_scores_ties_to_the_lower_index() -> None:
    models = column(0, 1, 2, 3, 100)
    assert krum_select(models, f=1, m=1) == [1]
    assert krum_select(models, f=1, m=3) == [1, 2, 0]
    assert 4 not in krum_select(models, f=1, m=4)


def test_krum_needs_a_neighbour_and_a_sane_m() -> None:
    with pytest.raises(ValueError, match="n - f - 2 >= 1"):
        krum_scores(column(0, 1, 2), f=1)
    with pytest.raises(ValueError, match="1 <= m <= n"):
        krum_select(column(0, 1, 2, 3, 4), f=1, m=6)


# --- server optimizers ----------------------------------------------------------------


def a(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def test_pseudo_gradient_and_momentum_by_hand() -> None:
    # Delta = w_t - mean: 3 - 1 = 2. v = 0.9 * [1, -2] + [0.5, 0.5] = [1.4, -1.3].
    np.testing.assert_allclose(pseudo_gradient(a(3), a(1)), [2.0])
    np.testing.assert_allclose(momentum(a(1, -2), a(0.5, 0.5), 0.9), [1.4, -1.3])


def test_moments_by_hand() -> None:
    # m = 0.9 * 1 + 0.1 * 3 = 1.2
    np.testing.assert_allclose(first_moment(a(1), a(3), 0.9), [1.2])
    # adagrad: 1 + 2^2 = 5; adam: 0.99 * 1 + 0.01 * 4 = 1.03
    np.testing.assert_allclose(adagrad_moment(a(1), a(2)), [5.0])
    np.testing.assert_allclose(adam_moment(a(1), a(2), 0.99), [1.03])
    # yogi: v - 0.01 * 4 * sign(v - 4): v = 1 grows to 1.04, v = 9 shrinks to 8.96,
    # v = 4 stays (sign 0).
    np.testing.assert_allclose(yogi_moment(a(1, 9, 4), a(2, 2, 2), 0.99), [1.04, 8.96, 4.0])


def test_adaptive_step_by_hand() -> None:
    # 1 + 0.1 * 0.5 / (sqrt(4) + 0.5) = 1.02
    np.testing.assert_allclose(adaptive_step(a(1), a(0.5), a(4), eta=0.1, tau=0.5), [1.02])
