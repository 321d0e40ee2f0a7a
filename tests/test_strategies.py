"""The aggregation rules, their settings and the registry, on tiny hand-worked arrays."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fedsim import config, weights
from fedsim.aggregator import strategies
from fedsim.aggregator.strategies import (
    AsyncWeighted,
    FedAsync,
    FedAvg,
    Global,
    Refused,
    Update,
)
from fedsim.aggregator.strategies.asynchronous import FedBuff
from fedsim.aggregator.strategies.fedavg import FedProx
from fedsim.aggregator.strategies.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fedsim.aggregator.strategies.robust import Krum, Median, TrimmedMean
from fedsim.rules import SERVER_LEARNING_RATE
from fedsim.settings import integer, number


def w(*values: float) -> dict[str, np.ndarray]:
    return {"x": np.array(values, dtype=np.float32)}


def update(client: str, values: tuple[float, ...], n: int, base: int = 0) -> Update:
    return Update(client, f"{client}-{base}-{n}", base, n, w(*values))


class WithRules:
    """Resolved settings plus the rules' own rows, parsed by those rows' parsers."""

    def __init__(self, base: config.Settings, rules: dict[str, Any]) -> None:
        self._base, self._rules = base, rules

    def __getattr__(self, name: str) -> Any:
        return self._rules[name] if name in self._rules else getattr(self._base, name)


@pytest.fixture
def rule_settings(make_settings) -> Callable[..., Any]:
    """Settings for a rule: common keys through fedsim.config, the rules' keys by their rows."""

    def make(**values: object) -> Any:
        rows = {row.key: row for row in strategies.rule_settings()}
        common = {k: v for k, v in values.items() if k not in rows and k != "AGGREGATION"}
        rules = {
            key.lower(): row.parse(str(values.get(key, row.default))) for key, row in rows.items()
        }
        rules["aggregation"] = strategies.parse_name(str(values.get("AGGREGATION", "fedavg")))
        return WithRules(make_settings(**common), rules)

    return make


def build(settings: Any) -> Any:
    """The rule as the aggregator gets it: settings checked (as fedsim.config.load does), then built."""
    strategies.check(settings)
    return strategies.build(settings)


ROUNDS_OF_10 = {"PARTITION": "iid", "NUM_CLIENTS": 100, "CLIENTS_PER_ROUND": 10}


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


# --- fedavg, fedprox ------------------------------------------------------------------


def test_fedavg_is_the_sample_weighted_mean_of_the_round() -> None:
    rule = FedAvg()
    current = Global(w(9, 9), version=0, samples=0)
    out = rule.aggregate(current, [update("a", (0, 3), n=1), update("b", (4, 7), n=3)])
    # (1*[0, 3] + 3*[4, 7]) / 4 = [3, 6]; the current model does not enter.
    np.testing.assert_allclose(out["x"], [3.0, 6.0], rtol=1e-7)
    assert rule.mode == "rounds"


def test_fedprox_aggregates_as_fedavg_and_sends_mu_to_clients(rule_settings) -> None:
    # Prepare
    rule = build(rule_settings(AGGREGATION="fedprox", FEDPROX_MU="0.1"))
    ups = [update("a", (0, 3), n=1), update("b", (4, 7), n=3)]
    # Execute
    out = rule.aggregate(Global(w(9, 9), 0, 0), ups)
    # Assert: the same [3, 6] as fedavg; the task's training carries mu.
    assert isinstance(rule, FedProx) and rule.mode == "rounds"
    np.testing.assert_allclose(out["x"], [3.0, 6.0], rtol=1e-7)
    assert rule.client_settings() == {"proximal_mu": 0.1}
    assert FedAvg().client_settings() == {}


def test_fedprox_default_mu(rule_settings) -> None:
    assert build(rule_settings(AGGREGATION="fedprox")).mu == 0.01


# --- fedasync -------------------------------------------------------------------------


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
    assert rule.state_dict() == {} and rule.tensor_state() == {}


@pytest.mark.parametrize(("alpha", "a"), [(0.0, 0.5), (1.5, 0.5), (0.5, -1.0)])
def test_fedasync_rejects_bad_settings(alpha: float, a: float) -> None:
    with pytest.raises(ValueError, match="bad fedasync settings"):
        FedAsync(alpha=alpha, a=a)


def test_build_picks_the_configured_strategy(make_settings) -> None:
    assert isinstance(build(make_settings(AGGREGATION="async-weighted")), AsyncWeighted)
    assert isinstance(build(make_settings(AGGREGATION="fedavg")), FedAvg)
    fedasync = build(
        make_settings(AGGREGATION="fedasync", FEDASYNC_ALPHA=0.6, FEDASYNC_STALENESS=1)
    )
    assert isinstance(fedasync, FedAsync)
    assert (fedasync.alpha, fedasync.a) == (0.6, 1.0)


# --- fedbuff --------------------------------------------------------------------------


def test_fedbuff_buffers_k_weighted_deltas_then_steps() -> None:
    # Prepare: K = 3, eta = 1.5; the global model is [0, 0] at version 9.
    rule = FedBuff(k=3, eta=1.5)
    current = Global(w(0, 0), version=9, samples=0)
    # Fresh (tau = 0, s = 1): delta [3, 0] - [0, 0] = [3, 0].
    first = rule.accept(update("a", (3, 0), n=5, base=9), current, base=current)
    # From version 6 (tau = 3, s = 1/2) whose model was [1, 1]: delta [0, 4], weighted [0, 2].
    v6 = Global(w(1, 1), version=6, samples=0)
    second = rule.accept(update("b", (1, 5), n=5, base=6), current, base=v6)
    assert first is None and second is None and rule.pending == 2
    assert rule.state_dict() == {"buffered": 2}
    # Execute: from version 1 (tau = 8, s = 1/3) whose model was [0, 3]: delta [3, 3] -> [1, 1].
    v1 = Global(w(0, 3), version=1, samples=0)
    out = rule.accept(update("c", (3, 6), n=5, base=1), current, base=v1)
    # Assert: buffer [3, 0] + [0, 2] + [1, 1] = [4, 3]; w = [0, 0] + 1.5 * [4, 3] / 3 = [2, 1.5].
    assert out is not None
    np.testing.assert_allclose(out["x"], [2.0, 1.5], rtol=1e-6)
    assert rule.pending == 0 and rule.tensor_state() == {}


def test_fedbuff_without_the_base_takes_the_delta_against_the_current_model() -> None:
    rule = FedBuff(k=1, eta=1.0)
    current = Global(w(2, 2), version=4, samples=0)
    # No base snapshot: delta = [6, 2] - [2, 2] = [4, 0], s(3) = 1/2: w = [2, 2] + [2, 0].
    out = rule.accept(update("a", (6, 2), n=1, base=1), current, base=None)
    np.testing.assert_allclose(out["x"], [4.0, 2.0], rtol=1e-6)
    # A snapshot of another version than the update's base is not used either.
    wrong = Global(w(100, 100), version=2, samples=0)
    again = rule.accept(update("a", (6, 2), n=1, base=1), current, base=wrong)
    np.testing.assert_array_equal(again["x"], out["x"])


def test_fedbuff_flush_applies_a_partial_buffer_as_its_mean() -> None:
    rule = FedBuff(k=10, eta=1.0)
    current = Global(w(0), version=0, samples=0)
    assert rule.flush(current) is None
    rule.accept(update("a", (2,), n=1), current, base=current)
    rule.accept(update("b", (4,), n=1), current, base=current)
    # (2 + 4) / 2 = 3, not / 10.
    out = rule.flush(current)
    np.testing.assert_allclose(out["x"], [3.0], rtol=1e-6)
    assert rule.pending == 0 and rule.flush(current) is None


def test_fedbuff_settings(rule_settings) -> None:
    rule = build(rule_settings(AGGREGATION="fedbuff", **ROUNDS_OF_10))
    assert isinstance(rule, FedBuff) and rule.mode == "async" and rule.wants_base
    assert (rule.k, rule.eta) == (10, 1.0)  # SERVER_LEARNING_RATE=0: fedbuff's own eta
    rule = build(
        rule_settings(AGGREGATION="fedbuff", FEDBUFF_K=4, SERVER_LEARNING_RATE=0.5, **ROUNDS_OF_10)
    )
    assert (rule.k, rule.eta) == (4, 0.5)


def test_fedbuff_k_larger_than_the_run_is_refused(rule_settings) -> None:
    # The default run: slices 1-4 5-8 9-12 make 12 updates.
    with pytest.raises(config.ConfigError) as info:
        strategies.check(rule_settings(AGGREGATION="fedbuff", FEDBUFF_K=13))
    assert one_line_error(info) == (
        "invalid setting FEDBUFF_K='13': the run makes only 12 updates (the slices in "
        "CLIENT_SLICES), fewer than one buffer: lower FEDBUFF_K"
    )
    # Sampled clients: ROUNDS x CLIENTS_PER_ROUND = 3 x 10 updates.
    with pytest.raises(config.ConfigError) as info:
        strategies.check(
            rule_settings(AGGREGATION="fedbuff", FEDBUFF_K=31, ROUNDS=3, **ROUNDS_OF_10)
        )
    assert one_line_error(info).endswith(
        "only 30 updates (ROUNDS x CLIENTS_PER_ROUND), fewer than one buffer: "
        "lower FEDBUFF_K or raise ROUNDS"
    )
    assert (
        build(rule_settings(AGGREGATION="fedbuff", FEDBUFF_K=30, ROUNDS=3, **ROUNDS_OF_10)).k == 30
    )


# --- fedavgm --------------------------------------------------------------------------


def test_fedavgm_two_rounds_by_hand() -> None:
    # Prepare: eta = 2, beta = 0.5; w_0 = [1, 1].
    rule = FedAvgM(eta=2.0, beta=0.5)
    # Round 1: mean (1*[0, 2] + 3*[2, 4]) / 4 = [1.5, 3.5]; Delta = w - mean = [-0.5, -2.5];
    # v = Delta; w = [1, 1] - 2 * v = [2, 6].
    w1 = rule.aggregate(Global(w(1, 1), 0, 0), [update("a", (0, 2), 1), update("b", (2, 4), 3)])
    np.testing.assert_allclose(w1["x"], [2.0, 6.0], rtol=1e-6)
    # Round 2: mean [3, 6]; Delta = [-1, 0]; v = 0.5 * [-0.5, -2.5] + [-1, 0] = [-1.25, -1.25];
    # w = [2, 6] - 2 * v = [4.5, 8.5].
    w2 = rule.aggregate(Global(w1, 1, 4), [update("a", (3, 6), 1), update("b", (3, 6), 1)])
    np.testing.assert_allclose(w2["x"], [4.5, 8.5], rtol=1e-6)
    np.testing.assert_allclose(rule.tensor_state()["momentum/x"], [-1.25, -1.25], rtol=1e-6)
    assert rule.state_dict() == {"rounds": 2}


def test_fedavgm_settings(rule_settings) -> None:
    rule = build(rule_settings(AGGREGATION="fedavgm"))
    assert (rule.eta, rule.beta) == (FedAvgM.default_eta, 0.9)
    rule = build(rule_settings(AGGREGATION="fedavgm", SERVER_LEARNING_RATE=0.3, SERVER_MOMENTUM=0))
    assert (rule.eta, rule.beta) == (0.3, 0.0)


# --- fedadam, fedyogi, fedadagrad -----------------------------------------------------


def test_adaptive_rules_two_rounds_by_hand() -> None:
    # Prepare: eta = 2, beta1 = 0.5, beta2 = 0.75, tau = 1: v_{-1} = tau^2 = 1, m_{-1} = 0.
    kw = {"eta": 2.0, "beta1": 0.5, "beta2": 0.75, "tau": 1.0}
    adam, yogi, adagrad = FedAdam(**kw), FedYogi(**kw), FedAdagrad(**kw)
    x0 = Global(w(0, 10), 0, 0)
    # Round 1: Delta = mean - x = [1, 9] - [0, 10] = [1, -1]; m = [0.5, -0.5].
    # adam: 0.75 * 1 + 0.25 * 1 = 1; yogi: 1 - 0.25 * 1 * sign(0) = 1: x = x + 2 m / (1 + 1).
    for rule in (adam, yogi):
        out = rule.aggregate(x0, [update("a", (1, 9), 1)])
        np.testing.assert_allclose(out["x"], [0.5, 9.5], rtol=1e-6)
    # adagrad: v = 1 + 1 = 2: x = [0, 10] + 2 * [0.5, -0.5] / (sqrt(2) + 1).
    out = adagrad.aggregate(x0, [update("a", (1, 9), 1)])
    np.testing.assert_allclose(out["x"], [1 / (2**0.5 + 1), 10 - 1 / (2**0.5 + 1)], rtol=1e-6)
    # Round 2 from [0.5, 9.5] with Delta = [2, 0]: m = 0.5 * [0.5, -0.5] + 0.5 * [2, 0].
    x1 = Global(w(0.5, 9.5), 1, 1)
    for rule in (adam, yogi, adagrad):
        rule.aggregate(x1, [update("a", (2.5, 9.5), 1)])
        np.testing.assert_allclose(rule.tensor_state()["m/x"], [1.25, -0.25], rtol=1e-6)
    # v: adam 0.75 * [1, 1] + 0.25 * [4, 0] = [1.75, 0.75];
    # yogi [1, 1] - 0.25 * [4, 0] * sign([1 - 4, 1 - 0]) = [2, 1]; adagrad [2, 2] + [4, 0].
    np.testing.assert_allclose(adam.tensor_state()["v/x"], [1.75, 0.75], rtol=1e-6)
    np.testing.assert_allclose(yogi.tensor_state()["v/x"], [2.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(adagrad.tensor_state()["v/x"], [6.0, 2.0], rtol=1e-6)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_rule_settings(rule_settings, name: str) -> None:
    rule = build(rule_settings(AGGREGATION=name))
    assert rule.name == name and rule.eta == rule.default_eta
    assert (rule.beta1, rule.tau) == (0.9, 0.001)
    custom = build(
        rule_settings(AGGREGATION=name, SERVER_LEARNING_RATE=0.2, SERVER_BETA1=0, SERVER_TAU=0.1)
    )
    assert (custom.eta, custom.beta1, custom.tau) == (0.2, 0.0, 0.1)


def test_server_learning_rate_row_names_every_rules_default() -> None:
    # The row's description lists each rule's own eta; it must say what the code does.
    users = [
        strategies.rule_class(n)
        for n in strategies.names()
        if SERVER_LEARNING_RATE in strategies.rows_of(n)
    ]
    assert {c.name for c in users} == {"fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedbuff"}
    for cls in users:
        assert f"{cls.name} {cls.default_eta:g}" in SERVER_LEARNING_RATE.why


# --- server state survives a checkpoint bit for bit ------------------------------------


def through_checkpoint(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a checkpoint gives back: the safetensors codec the aggregator writes with."""
    if not tensors:
        return {}
    decoded, _ = weights.decode(weights.encode(tensors, {}))
    return dict(decoded)


def rounds_of(seed: int, n: int) -> list[list[Update]]:
    rng = np.random.default_rng(seed)
    shapes = {"k": (3, 4), "b": (4,)}
    return [
        [
            Update(
                f"c{i}",
                f"r{r}.c{i}",
                r,
                int(rng.integers(1, 50)),
                {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()},
            )
            for i in range(4)
        ]
        for r in range(n)
    ]


SERVER_RULES: dict[str, Callable[[], Any]] = {
    "fedavgm": lambda: FedAvgM(eta=0.7, beta=0.9),
    "fedadam": lambda: FedAdam(eta=0.05, beta1=0.9, beta2=0.99, tau=1e-3),
    "fedyogi": lambda: FedYogi(eta=0.05, beta1=0.9, beta2=0.99, tau=1e-3),
    "fedadagrad": lambda: FedAdagrad(eta=0.1, beta1=0.9, beta2=0.0, tau=1e-3),
}


@pytest.mark.parametrize("name", sorted(SERVER_RULES))
def test_server_optimizer_state_round_trip_is_bit_for_bit(name: str) -> None:
    # Prepare: three rounds unbroken, and the same run stopped after round 2.
    rounds = rounds_of(seed=7, n=3)
    start = {k: np.zeros_like(v) for k, v in rounds[0][0].tensors.items()}
    unbroken, stopped = SERVER_RULES[name](), SERVER_RULES[name]()
    x = Global(start, 0, 0)
    for r in range(2):
        x_next = unbroken.aggregate(x, rounds[r])
        same = stopped.aggregate(x, rounds[r])
        x = Global(x_next, r + 1, 0)
    # Execute: a fresh rule resumes from what a checkpoint holds.
    resumed = SERVER_RULES[name]()
    resumed.load_state_dict(stopped.state_dict())
    resumed.load_tensor_state(through_checkpoint(stopped.tensor_state()))
    # Assert: the third round's step is the same, bit for bit.
    assert set(stopped.tensor_state()) and np.array_equal(same["k"], x.tensors["k"])
    a, b = unbroken.aggregate(x, rounds[2]), resumed.aggregate(x, rounds[2])
    for tensor in a:
        assert np.array_equal(a[tensor], b[tensor]), tensor
    assert unbroken.state_dict() == resumed.state_dict() == {"rounds": 3}
    # A rule that has not stepped yet keeps no tensors, and resumes from none.
    fresh = SERVER_RULES[name]()
    assert fresh.tensor_state() == {}
    fresh.load_tensor_state({})


def test_fedbuff_buffer_round_trip_is_bit_for_bit() -> None:
    rounds = rounds_of(seed=11, n=1)[0]
    start = {k: np.zeros_like(v) for k, v in rounds[0].tensors.items()}
    current = Global(start, 0, 0)
    unbroken, stopped = FedBuff(k=4, eta=0.9), FedBuff(k=4, eta=0.9)
    for u in rounds[:3]:
        assert unbroken.accept(u, current, current) is None
        stopped.accept(u, current, current)
    resumed = FedBuff(k=4, eta=0.9)
    resumed.load_state_dict(stopped.state_dict())
    resumed.load_tensor_state(through_checkpoint(stopped.tensor_state()))
    a = unbroken.accept(rounds[3], current, current)
    b = resumed.accept(rounds[3], current, current)
    for tensor in a:
        assert np.array_equal(a[tensor], b[tensor]), tensor


@pytest.mark.parametrize("name", sorted(SERVER_RULES))
def test_tensor_state_taken_before_a_step_does_not_change(name: str) -> None:
    # A checkpoint writes the tensors after the lock is released, while rounds go on.
    rounds = rounds_of(seed=3, n=2)
    x = Global({k: np.zeros_like(v) for k, v in rounds[0][0].tensors.items()}, 0, 0)
    rule = SERVER_RULES[name]()
    x = Global(rule.aggregate(x, rounds[0]), 1, 0)
    view = rule.tensor_state()
    copy = {k: v.copy() for k, v in view.items()}
    rule.aggregate(x, rounds[1])
    assert all(np.array_equal(view[k], copy[k]) for k in copy)
    assert any(not np.array_equal(rule.tensor_state()[k], copy[k]) for k in copy)


def test_fedbuff_tensor_state_taken_while_buffering_does_not_change() -> None:
    ups = rounds_of(seed=4, n=1)[0]
    current = Global({k: np.zeros_like(v) for k, v in ups[0].tensors.items()}, 0, 0)
    rule = FedBuff(k=3, eta=1.0)
    rule.accept(ups[0], current, current)
    view = rule.tensor_state()
    copy = {k: v.copy() for k, v in view.items()}
    rule.accept(ups[1], current, current)
    rule.accept(ups[2], current, current)
    assert all(np.array_equal(view[k], copy[k]) for k in copy)


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        ({"m/x": np.zeros(2, "f4")}, "differ in names or shapes"),  # v missing
        ({"m/x": np.zeros(2, "f4"), "v/x": np.zeros(3, "f4")}, "differ in names or shapes"),
        ({"m/x": np.zeros(2, "f4"), "w/x": np.zeros(2, "f4")}, "unexpected state tensor 'w/x'"),
        ({"m/x": np.zeros(2, "f8"), "v/x": np.zeros(2, "f4")}, "finite float32"),
        ({"m/x": np.full(2, np.nan, "f4"), "v/x": np.zeros(2, "f4")}, "finite float32"),
        ({"m/x": np.zeros(2, "f4"), "v/x": -np.ones(2, "f4")}, "v must be >= 0"),
    ],
)
def test_bad_adaptive_tensor_state_is_refused(tensors: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FedAdam(eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3).load_tensor_state(tensors)


def test_server_state_that_does_not_fit_the_model_is_refused_at_the_next_step() -> None:
    rule = FedAvgM(eta=1.0, beta=0.9)
    rule.load_tensor_state({"momentum/x": np.zeros(3, "f4")})
    with pytest.raises(ValueError, match="fedavgm momentum does not fit the model at tensor x"):
        rule.aggregate(Global(w(0, 0), 0, 0), [update("a", (1, 1), 1)])


def test_bad_json_state_is_refused() -> None:
    with pytest.raises(ValueError, match="'rounds' must be an integer >= 0"):
        FedYogi(eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3).load_state_dict({"rounds": "2"})
    with pytest.raises(ValueError, match="'buffered' must be an integer >= 0"):
        FedBuff(k=2, eta=1.0).load_state_dict({"buffered": -1})
    buff = FedBuff(k=2, eta=1.0)
    buff.load_state_dict({"buffered": 1})
    with pytest.raises(ValueError, match="holds 1 buffered updates but no buffer"):
        buff.load_tensor_state({})
    with pytest.raises(ValueError, match="keeps no tensors"):
        FedAvg().load_tensor_state({"m/x": np.zeros(1, "f4")})


# --- robust rules ---------------------------------------------------------------------


def test_median_and_trimmed_mean_ignore_sample_counts() -> None:
    # A huge claimed count does not pull the robust rules, unlike fedavg.
    ups = [
        update("a", (0,), 1),
        update("b", (1,), 1),
        update("c", (2,), 1),
        update("d", (9,), 10**6),
    ]
    current = Global(w(0), 0, 0)
    np.testing.assert_allclose(Median().aggregate(current, ups)["x"], [1.5])
    # beta = 0.25 of 4: drop 0 and 9, mean(1, 2) = 1.5.
    np.testing.assert_allclose(TrimmedMean(beta=0.25).aggregate(current, ups)["x"], [1.5])
    assert FedAvg().aggregate(current, ups)["x"][0] > 8.9


def test_krum_and_multi_krum_by_hand() -> None:
    # Values 0 1 2 3 100 (scores 5 2 2 5 19013, f = 1): Krum keeps 1; m = 3 averages 1, 2, 0.
    ups = [update(f"c{v}", (v,), n=v + 1) for v in (0, 1, 2, 3, 100)]
    current = Global(w(0), 0, 0)
    np.testing.assert_array_equal(Krum(f=1, m=1).aggregate(current, ups)["x"], [1.0])
    np.testing.assert_allclose(Krum(f=1, m=3).aggregate(current, ups)["x"], [1.0])
    # m beyond n - f = 4 is capped at 4: mean(1, 2, 0, 3) = 1.5, never the outlier.
    np.testing.assert_allclose(Krum(f=1, m=5).aggregate(current, ups)["x"], [1.5])


def test_krum_round_with_too_few_updates_is_refused() -> None:
    ups = [update(f"c{v}", (v,), n=1) for v in range(4)]  # 4 <= 2f + 2 for f = 1
    with pytest.raises(Refused) as info:
        Krum(f=1, m=1).aggregate(Global(w(0), 0, 0), ups)
    assert info.value.code == "too_few_updates"
    assert info.value.reason == "krum needs at least 5 updates per round, the round has 4"


AVERAGING = {
    "fedavg": FedAvg,
    "fedprox": lambda: FedProx(mu=0.1),
    "fedavgm": lambda: FedAvgM(eta=1.0, beta=0.0),
    "median": Median,
    "trimmed-mean": lambda: TrimmedMean(beta=0.2),
    "krum": lambda: Krum(f=1, m=1),
    "multi-krum": lambda: Krum(f=1, m=3),
}


@pytest.mark.parametrize("name", sorted(AVERAGING))
def test_identical_updates_give_that_update(name: str) -> None:
    rng = np.random.default_rng(5)
    same = {"k": rng.normal(size=(6, 3)).astype(np.float32), "b": rng.normal(size=3).astype("f4")}
    current = Global({k: rng.normal(size=v.shape).astype("f4") for k, v in same.items()}, 3, 9)
    ups = [Update(f"c{i}", f"u{i}", 3, n, same) for i, n in enumerate((1, 7, 600, 2, 5))]
    out = AVERAGING[name]().aggregate(current, ups)
    for tensor, value in same.items():
        np.testing.assert_allclose(out[tensor], value, rtol=1e-6, atol=1e-7)
        assert out[tensor].dtype == np.float32


ROBUST = {
    "median": Median,
    "trimmed-mean": lambda: TrimmedMean(beta=0.1),
    "krum": lambda: Krum(f=1, m=1),
    "multi-krum": lambda: Krum(f=1, m=4),
}


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", sorted(ROBUST))
def test_robust_rules_ignore_one_huge_outlier_that_moves_fedavg(name: str, seed: int) -> None:
    # Prepare: 9 honest updates near a centre, one at +1e4 in every coordinate.
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=50).astype(np.float32)
    honest = [centre + rng.normal(scale=0.01, size=50).astype(np.float32) for _ in range(9)]
    bad = centre + np.float32(1e4)
    ups = [Update(f"c{i}", f"u{i}", 0, 100, {"x": v}) for i, v in enumerate([*honest, bad])]
    rng.shuffle(ups)
    current = Global({"x": centre}, 0, 0)
    # Execute
    robust = ROBUST[name]().aggregate(current, ups)["x"]
    mean = FedAvg().aggregate(current, ups)["x"]
    # Assert: fedavg moves a thousand away; the robust rule stays among the honest values.
    assert np.abs(mean - centre).min() > 900
    lo, hi = np.min(honest, axis=0), np.max(honest, axis=0)
    assert np.all(robust >= lo - 1e-6) and np.all(robust <= hi + 1e-6)


# --- settings -------------------------------------------------------------------------


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_krum_needs_more_than_2f_plus_2_updates_per_round(rule_settings) -> None:
    settings = rule_settings(
        AGGREGATION="krum", KRUM_F=3, PARTITION="iid", NUM_CLIENTS=100, CLIENTS_PER_ROUND=5
    )
    with pytest.raises(config.ConfigError) as info:
        strategies.check(settings)
    assert one_line_error(info) == (
        "invalid setting KRUM_F='3': KRUM_F=3 needs at least 9 updates per round (n > 2f + 2); "
        "CLIENTS_PER_ROUND is 5: raise it or lower KRUM_F"
    )


def test_krum_counts_the_rounds_that_close_at_min_clients(rule_settings) -> None:
    settings = rule_settings(AGGREGATION="krum", MIN_CLIENTS=4, ROUND_DEADLINE=60, **ROUNDS_OF_10)
    with pytest.raises(config.ConfigError) as info:
        strategies.check(settings)
    assert one_line_error(info).endswith(
        "rounds close at MIN_CLIENTS=4 updates: raise MIN_CLIENTS or lower KRUM_F"
    )
    settings = rule_settings(AGGREGATION="krum", ROUND_DEADLINE="auto", **ROUNDS_OF_10)
    with pytest.raises(config.ConfigError) as info:
        strategies.check(settings)
    assert one_line_error(info).endswith(
        "rounds close at ROUND_DEADLINE with 1 update (MIN_CLIENTS=0): raise MIN_CLIENTS or "
        "lower KRUM_F"
    )


def test_krum_default_round_of_the_slices_partition_is_too_small(rule_settings) -> None:
    # Three ranges in CLIENT_SLICES: 3 clients per round; Krum with f = 1 needs 5.
    with pytest.raises(config.ConfigError) as info:
        strategies.check(rule_settings(AGGREGATION="krum"))
    assert "CLIENTS_PER_ROUND=0 samples 3 clients: raise it or lower KRUM_F" in one_line_error(info)


def test_multi_krum_m_must_leave_f_out(rule_settings) -> None:
    settings = rule_settings(AGGREGATION="krum", KRUM_F=2, KRUM_M=9, **ROUNDS_OF_10)
    with pytest.raises(config.ConfigError) as info:
        strategies.check(settings)
    assert one_line_error(info) == (
        "invalid setting KRUM_M='9': KRUM_M=9 with KRUM_F=2 needs at least 11 updates per round "
        "(m <= n - f); CLIENTS_PER_ROUND is 10: raise it or lower KRUM_M"
    )
    rule = build(rule_settings(AGGREGATION="krum", KRUM_F=2, KRUM_M=8, **ROUNDS_OF_10))
    assert (rule.f, rule.m, rule.min_updates) == (2, 8, 7)


def test_trimmed_mean_that_would_trim_nothing_is_refused(rule_settings) -> None:
    settings = rule_settings(AGGREGATION="trimmed-mean", **{**ROUNDS_OF_10, "CLIENTS_PER_ROUND": 5})
    with pytest.raises(config.ConfigError) as info:
        strategies.check(settings)
    assert one_line_error(info) == (
        "invalid setting TRIM_BETA='0.1': TRIM_BETA=0.1 trims nothing from a round of fewer than "
        "10 updates; CLIENTS_PER_ROUND is 5: raise it or raise TRIM_BETA to at least 0.2"
    )
    ok = rule_settings(
        AGGREGATION="trimmed-mean",
        TRIM_BETA=0.2,
        CLIENTS_PER_ROUND=5,
        **{k: v for k, v in ROUNDS_OF_10.items() if k != "CLIENTS_PER_ROUND"},
    )
    assert build(ok).beta == 0.2


def test_trimmed_mean_with_three_clients_suggests_a_beta_that_trims_one(rule_settings) -> None:
    with pytest.raises(config.ConfigError) as info:
        strategies.check(rule_settings(AGGREGATION="trimmed-mean"))
    fix = one_line_error(info).rsplit("at least ", 1)[1]
    # 0.334 * 3 = 1.002: one value trimmed at each end, and the rule accepts it.
    assert fix == "0.334"
    assert build(rule_settings(AGGREGATION="trimmed-mean", TRIM_BETA=fix)).beta == 0.334


def test_trimmed_mean_with_two_clients_can_only_raise_the_round(rule_settings) -> None:
    settings = rule_settings(AGGREGATION="trimmed-mean", CLIENT_SLICES="1-6 7-12")
    with pytest.raises(config.ConfigError) as info:
        strategies.check(settings)
    assert one_line_error(info).endswith("CLIENTS_PER_ROUND=0 samples 2 clients: raise it")


@pytest.mark.parametrize(
    ("key", "raw", "allowed"),
    [
        ("TRIM_BETA", "0.5", "a number > 0 and < 0.5"),
        ("TRIM_BETA", "0", "a number > 0 and < 0.5"),
        ("KRUM_F", "-1", "an integer >= 0"),
        ("KRUM_M", "0", "an integer >= 1"),
        ("KRUM_M", "two", "an integer >= 1"),
        ("FEDBUFF_K", "0", "an integer >= 1"),
        ("SERVER_MOMENTUM", "1", "a number >= 0 and < 1"),
        ("SERVER_BETA1", "-0.1", "a number >= 0 and < 1"),
        ("SERVER_BETA2", "nan", "a number >= 0 and < 1"),
        ("SERVER_TAU", "0", "a number > 0"),
        ("SERVER_LEARNING_RATE", "-1", "a number >= 0"),
        ("SERVER_LEARNING_RATE", "inf", "a number >= 0"),
        ("FEDPROX_MU", "-0.01", "a number >= 0"),
        ("FEDASYNC_ALPHA", "1.5", "a number > 0 and <= 1"),
        ("FEDASYNC_STALENESS", "-0.5", "a number >= 0"),
    ],
)
def test_rule_rows_refuse_bad_values(key: str, raw: str, allowed: str) -> None:
    row = {r.key: r for r in strategies.rule_settings()}[key]
    with pytest.raises(ValueError) as info:
        row.parse(raw)
    assert str(info.value) == allowed


def test_every_rule_row_parses_its_default() -> None:
    for row in strategies.rule_settings():
        row.parse(row.default)
        # One line, and no "|": the README's settings table shows it whole.
        assert row.why and "\n" not in row.why and "|" not in row.why, row.key


def test_parsers() -> None:
    assert number(0, 1, above=True)("1") == 1.0
    assert integer(2)(" 3 ") == 3
    with pytest.raises(ValueError, match="an integer >= 2"):
        integer(2)("1.5")


# --- registry -------------------------------------------------------------------------


def test_registry_resolves_every_rule_to_its_class() -> None:
    for name in strategies.names():
        cls = strategies.rule_class(name)
        assert cls.name == name and cls.mode in ("async", "rounds"), name
        # Every published rule names its paper, with the year, in its docstring's first line.
        first_line = (cls.__doc__ or "").splitlines()[0]
        assert name == "async-weighted" or re.search(r"\(.*\b(19|20)\d\d\b", first_line), name
    modes = {n: strategies.rule_class(n).mode for n in strategies.names()}
    assert {n for n, m in modes.items() if m == "async"} == {
        "async-weighted",
        "fedasync",
        "fedbuff",
    }


def test_every_rule_builds_from_its_defaults(rule_settings) -> None:
    for name in strategies.names():
        rule = build(rule_settings(AGGREGATION=name, **ROUNDS_OF_10))
        assert rule.name == name


class Spy:
    """Settings that note which attributes a rule reads."""

    def __init__(self, settings: Any) -> None:
        self._settings, self.read = settings, set()

    def __getattr__(self, key: str) -> Any:
        self.read.add(key)
        return getattr(self._settings, key)


def test_each_registry_entry_lists_exactly_the_rows_its_rule_reads(rule_settings) -> None:
    rule_keys = {row.key.lower() for row in strategies.rule_settings()}
    for name in strategies.names():
        spy = Spy(rule_settings(AGGREGATION=name, **ROUNDS_OF_10))
        build(spy)
        assert spy.read & rule_keys == {row.key.lower() for row in strategies.rows_of(name)}, name


def test_rule_settings_lists_each_key_once() -> None:
    keys = [row.key for row in strategies.rule_settings()]
    assert len(keys) == len(set(keys))
    assert {"SERVER_LEARNING_RATE", "FEDPROX_MU", "KRUM_F", "FEDBUFF_K", "TRIM_BETA"} <= set(keys)


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [
        ("fedavgn", "fedavg"),
        ("FedAdm", "fedadam"),
        ("trimmed_mean", "trimmed-mean"),
        ("krun", "krum"),
    ],
)
def test_unknown_rule_suggests_the_closest_name(typo: str, suggestion: str) -> None:
    with pytest.raises(ValueError) as info:
        strategies.parse_name(typo)
    assert str(info.value).endswith(f"(did you mean {suggestion}?)")
    assert str(info.value).startswith("one of async-weighted, fedasync, fedbuff, fedavg, ")


def test_unknown_rule_without_a_close_name_lists_the_choices() -> None:
    with pytest.raises(ValueError) as info:
        strategies.parse_name("gradient-descent")
    assert "did you mean" not in str(info.value)


def test_build_refuses_an_unknown_rule_with_a_config_error(rule_settings) -> None:
    settings = rule_settings()
    settings._rules["aggregation"] = "fedyogy"
    with pytest.raises(config.ConfigError) as info:
        strategies.build(settings)
    assert one_line_error(info).startswith("invalid setting AGGREGATION='fedyogy': one of ")
    assert one_line_error(info).endswith("(did you mean fedyogi?)")


def test_aggregation_row_takes_any_case() -> None:
    assert strategies.AGGREGATION.parse(" FedAvgM ") == "fedavgm"
    assert strategies.AGGREGATION.default in strategies.names()
