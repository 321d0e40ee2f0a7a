"""The aggregation rules on tiny hand-worked arrays."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.aggregator import strategies
from fedsim.aggregator.strategies import (
    AsyncWeighted,
    FedAsync,
    FedAvg,
    Global,
    Update,
    fedasync_mix,
    polynomial_staleness,
    weighted_mean,
    weighted_merge,
)


def w(*values: float) -> dict[str, np.ndarray]:
    return {"x": np.array(values, dtype=np.float32)}


def update(client: str, values: tuple[float, ...], n: int, base: int = 0) -> Update:
    return Update(client, f"{client}-{base}-{n}", base, n, w(*values))


# --- math ---------------------------------------------------------------------------


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
    with pytest.raises(ValueError):
        weighted_mean([w(1), w(2)], [1])


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


# --- async-weighted -------------------------------------------------------------------


def test_async_weighted_every_update_is_a_version_and_base_is_never_refused() -> None:
    rule = AsyncWeighted()
    current = Global(w(1, 2), version=7, samples=2)
    # An update based on an old version is still taken.
    out = rule.accept(update("c1", (4, 8), n=1, base=0), current)
    np.testing.assert_allclose(out["x"], [2.0, 4.0], rtol=1e-6)
    assert rule.mode == "async"


def test_async_weighted_sequence_matches_the_running_mean() -> None:
    # Three updates folded one by one equal their sample-weighted mean.
    rule = AsyncWeighted()
    current = Global(w(0), version=0, samples=0)
    for values, n in (((3.0,), 1), ((6.0,), 2), ((1.0,), 3)):
        out = rule.accept(update("c", values, n), current)
        current = Global(out, current.version + 1, current.samples + n)
    # (1*3 + 2*6 + 3*1) / 6 = 3
    np.testing.assert_allclose(current.tensors["x"], [3.0], rtol=1e-6)


# --- fedavg -------------------------------------------------------------------------


def test_fedavg_is_the_sample_weighted_mean_of_the_round() -> None:
    rule = FedAvg()
    current = Global(w(9, 9), version=0, samples=0)
    out = rule.aggregate(current, [update("a", (0, 3), n=1), update("b", (4, 7), n=3)])
    # (1*[0, 3] + 3*[4, 7]) / 4 = [3, 6]; the current model does not enter.
    np.testing.assert_allclose(out["x"], [3.0, 6.0], rtol=1e-7)
    assert rule.mode == "rounds"


def test_fedavg_of_identical_updates_is_that_update() -> None:
    same = [update(c, (0.5, -2.0), n=n) for c, n in (("a", 1), ("b", 7), ("c", 600))]
    out = FedAvg().aggregate(Global(w(0, 0), 0, 0), same)
    np.testing.assert_allclose(out["x"], [0.5, -2.0], rtol=1e-7)


# --- fedasync -----------------------------------------------------------------------


def test_fedasync_fresh_update_mixes_at_alpha() -> None:
    # Prepare: global [0, 4] at version 2; a client trained from version 2 sends [8, 0].
    rule = FedAsync(alpha=0.5, a=0.5)
    current = Global(w(0, 4), version=2, samples=10)
    out = rule.accept(update("c1", (8, 0), n=5, base=2), current)
    # s(0) = 1, alpha_t = 0.5: [0.5*0 + 0.5*8, 0.5*4 + 0.5*0] = [4, 2].
    np.testing.assert_allclose(out["x"], [4.0, 2.0], rtol=1e-6)


def test_fedasync_stale_update_mixes_at_alpha_over_two() -> None:
    # Prepare: t - tau = 7 - 4 = 3, a = 0.5: s = 4 ** -0.5 = 1/2, alpha_t = 0.8/2 = 0.4.
    rule = FedAsync(alpha=0.8, a=0.5)
    current = Global(w(0, 10), version=7, samples=10)
    # An old base is never refused: [0.6*0 + 0.4*5, 0.6*10 + 0.4*0] = [2, 6].
    out = rule.accept(update("c1", (5, 0), n=5, base=4), current)
    np.testing.assert_allclose(out["x"], [2.0, 6.0], rtol=1e-6)


def test_fedasync_a_zero_is_a_constant_rate_whatever_the_staleness() -> None:
    rule = FedAsync(alpha=0.25, a=0.0)
    current = Global(w(4), version=50, samples=10)
    fresh = rule.accept(update("c1", (8,), n=1, base=50), current)
    stale = rule.accept(update("c2", (8,), n=1, base=0), current)
    # 0.75*4 + 0.25*8 = 5 both times.
    np.testing.assert_allclose(fresh["x"], [5.0], rtol=1e-6)
    np.testing.assert_allclose(stale["x"], [5.0], rtol=1e-6)


def test_fedasync_alpha_one_replaces_the_model_with_a_fresh_update() -> None:
    rule = FedAsync(alpha=1.0, a=0.5)
    current = Global(w(9, 9), version=3, samples=10)
    out = rule.accept(update("c1", (0.25, -3), n=1, base=3), current)
    np.testing.assert_array_equal(out["x"], [0.25, -3.0])


def test_fedasync_is_stateless_beyond_the_version() -> None:
    rule = FedAsync(alpha=0.5, a=0.5)
    rule.accept(update("c1", (1,), n=1), Global(w(0), 0, 0))
    assert rule.state_dict() == {}


@pytest.mark.parametrize(("alpha", "a"), [(0.0, 0.5), (1.5, 0.5), (0.5, -1.0)])
def test_fedasync_rejects_bad_settings(alpha: float, a: float) -> None:
    with pytest.raises(ValueError, match="bad fedasync settings"):
        FedAsync(alpha=alpha, a=a)


def test_build_picks_the_configured_strategy(make_settings) -> None:
    assert isinstance(strategies.build(make_settings(AGGREGATION="async-weighted")), AsyncWeighted)
    assert isinstance(strategies.build(make_settings(AGGREGATION="fedavg")), FedAvg)
    fedasync = strategies.build(
        make_settings(AGGREGATION="fedasync", FEDASYNC_ALPHA=0.6, FEDASYNC_STALENESS=1)
    )
    assert isinstance(fedasync, FedAsync)
    assert (fedasync.alpha, fedasync.a) == (0.6, 1.0)
