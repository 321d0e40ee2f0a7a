"""The privacy accountant (aggregator/privacy.py): epsilon against dp-accounting used directly
here, one event per round, the budget's last round, and the local mode's participations."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant

from fedsim import config
from fedsim.aggregator import privacy
from fedsim.aggregator.tasks import ids
from helpers.dp import composed_epsilon


def dp_settings(make_settings, **overrides) -> config.Settings:
    base = {"AGGREGATION": "fedavg", "PARTITION": "iid", "NUM_CLIENTS": 100}
    return make_settings(**{"DP": "central", "CLIENTS_PER_ROUND": 10, **base, **overrides})


@pytest.mark.parametrize(
    ("per_round", "z", "rounds"), [(10, 1.0, 1), (10, 1.0, 20), (50, 2.0, 5), (10, 0.5, 3)]
)
def test_central_epsilon_matches_the_library_round_by_round(per_round, z, rounds):
    delta = 1 / 100**1.1
    got = privacy.central_epsilon(100, per_round, z, rounds, delta)
    assert got == pytest.approx(composed_epsilon(100, per_round, z, rounds, delta), rel=1e-9)


def test_epsilon_grows_with_rounds_and_falls_with_noise():
    delta = 1e-3
    eps = [privacy.central_epsilon(100, 10, 1.0, r, delta) for r in (1, 5, 25)]
    assert eps == sorted(eps) and eps[0] > 0
    assert privacy.central_epsilon(100, 10, 2.0, 5, delta) < eps[1]
    assert privacy.central_epsilon(100, 10, 1.0, 0, delta) == 0.0


def test_no_noise_is_an_infinite_epsilon_shown_as_null_and_as_infinity(make_settings):
    account = privacy.Privacy(dp_settings(make_settings, DP_NOISE=0))
    assert math.isinf(account.epsilon(1))
    assert privacy.shown(account.epsilon(1)) is None
    assert privacy.text(account.epsilon(1)) == "∞"
    assert account.status(3)["epsilon"] is None


def test_the_status_block_reports_epsilon_at_the_default_delta(make_settings):
    account = privacy.Privacy(dp_settings(make_settings, DP_NOISE=1.0, ROUNDS=50))
    block = account.status(7)
    delta = 1 / 100**1.1
    assert block["delta"] == pytest.approx(delta)
    assert block["epsilon"] == pytest.approx(composed_epsilon(100, 10, 1.0, 7, delta), rel=1e-5)
    assert block["rounds_composed"] == 7 and block["rounds_allowed"] == 50
    assert block["stop_reason"] is None and block["adjacency"] == "replace one client"


def test_the_budget_allows_the_last_round_that_stays_within_it(make_settings):
    # Prepare: a budget halfway between epsilon after rounds 6 and 7 (computed here).
    delta = 1 / 100**1.1
    six, seven = (composed_epsilon(100, 10, 1.0, r, delta) for r in (6, 7))
    budget = (six + seven) / 2
    settings = dp_settings(make_settings, ROUNDS=20, DP_EPSILON_BUDGET=budget)
    # Execute
    account = privacy.Privacy(settings)
    # Assert: round 7 would pass the budget, so the run stops after round 6.
    assert account.allowed == 6 and privacy.rounds_allowed(settings) == 6
    reason = account.stop_reason()
    assert reason.startswith(f"DP_EPSILON_BUDGET={budget:g}: round 7 would take epsilon to ")
    assert reason.endswith("the run stops after round 6 of ROUNDS=20")
    assert f"{seven:.3f}" in reason


def test_a_budget_that_fits_every_round_changes_nothing(make_settings):
    settings = dp_settings(make_settings, ROUNDS=3, DP_EPSILON_BUDGET=1000)
    assert privacy.rounds_allowed(settings) == 3 and privacy.Privacy(settings).stop_reason() is None


def test_a_budget_below_one_round_is_refused_in_one_line(make_settings):
    settings = dp_settings(make_settings, DP_EPSILON_BUDGET=0.01)
    with pytest.raises(config.ConfigError) as refused:
        privacy.Privacy(settings)
    text = str(refused.value)
    assert text.startswith("invalid setting DP_EPSILON_BUDGET='0.01': below the epsilon of one")
    assert "raise it, raise DP_NOISE, or sample fewer clients per round" in text


def test_local_epsilon_composes_over_the_rounds_the_busiest_client_took_part_in(make_settings):
    # Prepare: the seeded sample of 8 rounds of 10 of 100 clients, counted here.
    settings = dp_settings(make_settings, DP="local", DP_NOISE=2.0)
    seen: dict[int, int] = {}
    for r in range(1, 9):
        for c in ids.sample(settings.seed, r, 10, 100):
            seen[c] = seen.get(c, 0) + 1
    busiest = max(seen.values())
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for _ in range(busiest):
        accountant.compose(dp_accounting.GaussianDpEvent(2.0 / 2))
    # Execute / Assert
    got = privacy.Privacy(settings).epsilon(8)
    assert got == pytest.approx(accountant.get_epsilon(settings.delta), rel=1e-9)
