"""The forms of the population's settings: spreads and availability, and their errors."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.data.spread import (
    availability_setting,
    bandwidth_setting,
    parse_spread,
    speed_setting,
)


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("1", "1"),
        (" 2.5 ", "2.5"),
        ("LogNormal:0,0.5", "lognormal:0,0.5"),
        ("uniform:1,4", "uniform:1,4"),
        ("slow:0.1,10", "slow:0.1,10,1"),
        ("slow:0.2,3,2", "slow:0.2,3,2"),
    ],
)
def test_speed_forms_are_written_back_in_one_form(raw: str, shown: str) -> None:
    assert speed_setting(raw) == shown


@pytest.mark.parametrize(
    "raw",
    ["0", "-1", "inf", "nan", "fast", "lognormal:0", "lognormal:0,-1", "uniform:3,1",
     "uniform:0,1", "slow:1.5,10", "slow:0.1,0.5", "slow:0.1,10,0", "slow:a,b", "pareto:1,2"],
)  # fmt: skip
def test_bad_speeds_say_what_is_allowed(raw: str) -> None:
    with pytest.raises(ValueError, match="a number, lognormal:MU,SIGMA, uniform:LO,HI or slow"):
        speed_setting(raw)


def test_bandwidth_allows_inf_and_needs_the_slow_base() -> None:
    assert bandwidth_setting("inf") == "inf"
    assert bandwidth_setting("slow:0.1,10,1e6") == "slow:0.1,10,1e+06"
    with pytest.raises(ValueError, match="slow needs its BASE"):
        bandwidth_setting("slow:0.1,10")


@pytest.mark.parametrize(
    ("raw", "shown"),
    [("always", "always"), ("Diurnal", "diurnal"), ("diurnal:0.25", "diurnal:0.25"),
     ("trace: traces/a.csv", "trace:traces/a.csv")],
)  # fmt: skip
def test_availability_forms(raw: str, shown: str) -> None:
    assert availability_setting(raw) == shown


@pytest.mark.parametrize("raw", ["sometimes", "diurnal:0", "diurnal:1.5", "diurnal:x", "trace:"])
def test_bad_availability_says_what_is_allowed(raw: str) -> None:
    with pytest.raises(ValueError, match=r"always, diurnal\[:FRACTION\]"):
        availability_setting(raw)


def test_parse_spread_draws_nothing_random_for_a_fixed_value() -> None:
    spread = parse_spread("3")
    assert spread.draw(4, np.random.default_rng(0), slower_divides=False).tolist() == [3.0] * 4
