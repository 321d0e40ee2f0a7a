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
    Refused,
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
    # Prepare
    rule = AsyncWeighted()
    current = Global(w(1, 2), version=7, samples=2)
    # Execute: an update based on an old version is still taken.
    agg = rule.accept(update("c1", (4, 8), n=1, base=0), current, now=0.0)
    # Assert
    assert agg is not None
    np.testing.assert_allclose(agg.tensors["x"], [2.0, 4.0], rtol=1e-6)
    assert [u.client_id for u in agg.updates] == ["c1"]
    assert not rule.finished
    assert rule.tick(current, now=1e9) is None


def test_async_weighted_sequence_matches_the_running_mean() -> None:
    # Three updates folded one by one equal their sample-weighted mean.
    rule = AsyncWeighted()
    current = Global(w(0), version=0, samples=0)
    for values, n in (((3.0,), 1), ((6.0,), 2), ((1.0,), 3)):
        agg = rule.accept(update("c", values, n), current, now=0.0)
        assert agg is not None
        current = Global(agg.tensors, current.version + 1, current.samples + n)
    # (1*3 + 2*6 + 3*1) / 6 = 3
    np.testing.assert_allclose(current.tensors["x"], [3.0], rtol=1e-6)


# --- fedavg -------------------------------------------------------------------------


def test_fedavg_round_closes_at_quorum_with_the_weighted_mean() -> None:
    # Prepare
    rule = FedAvg(quorum=2, timeout=60, rounds=3)
    current = Global(w(9, 9), version=0, samples=0)
    # Execute
    first = rule.accept(update("a", (0, 3), n=1), current, now=0.0)
    second = rule.accept(update("b", (4, 7), n=3), current, now=1.0)
    # Assert
    assert first is None
    assert rule.pending() == 0
    assert second is not None
    np.testing.assert_allclose(second.tensors["x"], [3.0, 6.0], rtol=1e-7)
    assert [u.client_id for u in second.updates] == ["a", "b"]
    assert second.reason == "round 1 closed by quorum"
    assert rule.rounds_done == 1


def test_fedavg_refuses_stale_base_version() -> None:
    rule = FedAvg(quorum=2, timeout=60, rounds=3)
    current = Global(w(0), version=4, samples=10)
    with pytest.raises(Refused) as info:
        rule.accept(update("a", (1,), n=1, base=3), current, now=0.0)
    assert info.value.code == "stale"
    assert not info.value.finished
    assert rule.pending() == 0


def test_fedavg_refuses_a_second_update_from_the_same_client_in_a_round() -> None:
    rule = FedAvg(quorum=3, timeout=60, rounds=3)
    current = Global(w(0), version=0, samples=0)
    assert rule.accept(update("a", (1,), n=1), current, now=0.0) is None
    with pytest.raises(Refused) as info:
        rule.accept(update("a", (2,), n=5), current, now=0.5)
    assert info.value.code == "duplicate_client"
    assert rule.pending() == 1


def test_fedavg_timeout_closes_a_round_with_what_arrived() -> None:
    # Prepare: quorum 3, one update at t=10; timeout 5 s.
    rule = FedAvg(quorum=3, timeout=5, rounds=3)
    current = Global(w(0), version=0, samples=0)
    rule.accept(update("a", (2,), n=4), current, now=10.0)
    # Execute / Assert: not yet at t=14.9, closed at t=15.
    assert rule.tick(current, now=14.9) is None
    assert rule.deadline() == 15.0
    agg = rule.tick(current, now=15.0)
    assert agg is not None
    np.testing.assert_array_equal(agg.tensors["x"], [2.0])
    assert agg.reason == "round 1 closed by timeout"
    assert rule.deadline() is None
    # An empty round never closes.
    assert rule.tick(current, now=1e9) is None


def test_fedavg_finishes_after_rounds() -> None:
    rule = FedAvg(quorum=1, timeout=5, rounds=2)
    current = Global(w(0), version=0, samples=0)
    for version in range(2):
        current = Global(current.tensors, version, current.samples)
        assert rule.accept(update("a", (1,), n=1, base=version), current, now=0.0) is not None
    assert rule.finished
    current = Global(current.tensors, 2, current.samples)
    with pytest.raises(Refused) as info:
        rule.accept(update("a", (1,), n=1, base=2), current, now=0.0)
    assert info.value.code == "finished"
    assert info.value.finished


def test_fedavg_state_dict_round_trip() -> None:
    rule = FedAvg(quorum=1, timeout=5, rounds=10)
    rule.accept(update("a", (1,), n=1), Global(w(0), 0, 0), now=0.0)
    fresh = FedAvg(quorum=1, timeout=5, rounds=10)
    fresh.load_state_dict(rule.state_dict())
    assert fresh.rounds_done == 1
    with pytest.raises(ValueError):
        fresh.load_state_dict({"rounds_done": -1})


# --- fedasync -----------------------------------------------------------------------


def test_fedasync_fresh_update_mixes_at_alpha() -> None:
    # Prepare: global [0, 4] at version 2; a client trained from version 2 sends [8, 0].
    rule = FedAsync(alpha=0.5, a=0.5)
    current = Global(w(0, 4), version=2, samples=10)
    # Execute
    agg = rule.accept(update("c1", (8, 0), n=5, base=2), current, now=0.0)
    # Assert: s(0) = 1, alpha_t = 0.5: [0.5*0 + 0.5*8, 0.5*4 + 0.5*0] = [4, 2].
    np.testing.assert_allclose(agg.tensors["x"], [4.0, 2.0], rtol=1e-6)
    assert [u.client_id for u in agg.updates] == ["c1"]
    assert agg.reason == "update"


def test_fedasync_stale_update_mixes_at_alpha_over_two() -> None:
    # Prepare: t - tau = 7 - 4 = 3, a = 0.5: s = 4 ** -0.5 = 1/2, alpha_t = 0.8/2 = 0.4.
    rule = FedAsync(alpha=0.8, a=0.5)
    current = Global(w(0, 10), version=7, samples=10)
    # Execute: an old base is never refused.
    agg = rule.accept(update("c1", (5, 0), n=5, base=4), current, now=0.0)
    # Assert: [0.6*0 + 0.4*5, 0.6*10 + 0.4*0] = [2, 6].
    np.testing.assert_allclose(agg.tensors["x"], [2.0, 6.0], rtol=1e-6)


def test_fedasync_a_zero_is_a_constant_rate_whatever_the_staleness() -> None:
    rule = FedAsync(alpha=0.25, a=0.0)
    current = Global(w(4), version=50, samples=10)
    fresh = rule.accept(update("c1", (8,), n=1, base=50), current, now=0.0)
    stale = rule.accept(update("c2", (8,), n=1, base=0), current, now=0.0)
    # 0.75*4 + 0.25*8 = 5 both times.
    np.testing.assert_allclose(fresh.tensors["x"], [5.0], rtol=1e-6)
    np.testing.assert_allclose(stale.tensors["x"], [5.0], rtol=1e-6)


def test_fedasync_alpha_one_replaces_the_model_with_a_fresh_update() -> None:
    rule = FedAsync(alpha=1.0, a=0.5)
    current = Global(w(9, 9), version=3, samples=10)
    agg = rule.accept(update("c1", (0.25, -3), n=1, base=3), current, now=0.0)
    np.testing.assert_array_equal(agg.tensors["x"], [0.25, -3.0])


def test_fedasync_is_stateless_beyond_the_version() -> None:
    rule = FedAsync(alpha=0.5, a=0.5)
    rule.accept(update("c1", (1,), n=1), Global(w(0), 0, 0), now=0.0)
    assert rule.state_dict() == {}
    assert not rule.finished and rule.pending() == 0
    assert rule.tick(Global(w(0), 1, 1), now=1e9) is None


@pytest.mark.parametrize(("alpha", "a"), [(0.0, 0.5), (1.5, 0.5), (0.5, -1.0)])
def test_fedasync_rejects_bad_settings(alpha: float, a: float) -> None:
    with pytest.raises(ValueError, match="bad fedasync settings"):
        FedAsync(alpha=alpha, a=a)


def test_build_picks_the_configured_strategy(make_settings) -> None:
    assert isinstance(strategies.build(make_settings(AGGREGATION="async-weighted")), AsyncWeighted)
    fedavg = strategies.build(
        make_settings(AGGREGATION="fedavg", CLIENT_SLICES="1-2 3-4 5-6", ROUNDS=4)
    )
    assert isinstance(fedavg, FedAvg)
    assert (fedavg.quorum, fedavg.rounds) == (3, 4)
    fedasync = strategies.build(
        make_settings(AGGREGATION="fedasync", FEDASYNC_ALPHA=0.6, FEDASYNC_STALENESS=1)
    )
    assert isinstance(fedasync, FedAsync)
    assert (fedasync.alpha, fedasync.a) == (0.6, 1.0)
