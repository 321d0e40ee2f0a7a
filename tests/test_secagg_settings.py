"""SECAGG's settings: the threshold resolved, and every refused combination's one line."""

from __future__ import annotations

import pytest

from fedsim.settings import ConfigError

BASE = {"SECAGG": "true", "AGGREGATION": "fedavg", "PARTITION": "iid", "NUM_CLIENTS": 20,
        "CLIENTS_PER_ROUND": 6}  # fmt: skip


def test_the_threshold_defaults_to_two_thirds(make_settings) -> None:
    assert make_settings(**BASE).secagg_t == 4
    assert make_settings(**{**BASE, "CLIENTS_PER_ROUND": 10}).secagg_t == 7
    assert make_settings(**{**BASE, "SECAGG_THRESHOLD": 6}).secagg_t == 6


@pytest.mark.parametrize(
    "rule", ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"]
)
def test_rules_that_average_run(make_settings, rule: str) -> None:
    assert make_settings(**{**BASE, "AGGREGATION": rule}).secagg


@pytest.mark.parametrize("dp", [{"DP": "central"}, {"DP": "local"}])
def test_dp_runs_with_the_clip_on_the_workers(make_settings, dp) -> None:
    settings = make_settings(**{**BASE, **dp})
    assert settings.secagg and settings.dp == dp["DP"] and settings.dp_clip_at == "worker"


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        ({"AGGREGATION": "median"}, "SECAGG", "AGGREGATION=median needs single updates"),
        ({"AGGREGATION": "trimmed-mean"}, "SECAGG", "AGGREGATION=trimmed-mean needs single"),
        ({"AGGREGATION": "krum"}, "SECAGG", "AGGREGATION=krum needs single updates"),
        ({"AGGREGATION": "fedbuff"}, "SECAGG", "AGGREGATION=fedbuff needs single updates"),
        ({"AGGREGATION": "async-weighted"}, "SECAGG", "async-weighted needs single updates"),
        ({"ATTACK": "scaled", "ATTACKERS": 1}, "SECAGG", "ATTACK=scaled: attacks are not"),
        ({"DP": "central", "DP_CLIP_AT": "aggregator"}, "DP_CLIP_AT", "clip on the workers"),
        ({"CLIENTS_PER_ROUND": 2}, "SECAGG", "2 clients per round: secure aggregation needs"),
        ({"SECAGG_THRESHOLD": 3}, "SECAGG_THRESHOLD", "more than half of and at most the 6"),
        ({"SECAGG_THRESHOLD": 7}, "SECAGG_THRESHOLD", r"\(4\.\.6\)"),
        ({"SECAGG": "false", "SECAGG_THRESHOLD": 4}, "SECAGG_THRESHOLD", "needs SECAGG=true"),
        ({"OVERSELECT": 1.5}, "SECAGG", "OVERSELECT=1.5: a secure round's phases wait"),
        ({"CLOCK": "virtual"}, "SECAGG", "CLOCK=virtual: a secure round's phases wait"),
        ({"ROUND_DEADLINE": "auto"}, "SECAGG", "ROUND_DEADLINE=auto: give secure rounds"),
    ],
)
def test_refused_combinations_say_why_in_one_line(make_settings, overrides, key, message) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        make_settings(**{**BASE, **overrides})
    assert caught.value.key == key
    assert "\n" not in str(caught.value)


def test_compression_is_refused_when_the_setting_exists() -> None:
    """COMPRESSION comes with another change; the check reads it with a default of none."""
    from types import SimpleNamespace

    from fedsim.pipeline.secagg.settings import check_settings

    s = SimpleNamespace(secagg=True, secagg_threshold=0, aggregation="fedavg", attack="none",
                        dp="off", per_round=6, secagg_t=4, compression="topk")  # fmt: skip
    with pytest.raises(ConfigError, match="COMPRESSION=topk: masked updates"):
        check_settings(s)
    check_settings(SimpleNamespace(**{**vars(s), "compression": "none"}))
    del s.compression
    check_settings(s)  # no such setting yet: none


def test_bad_values_name_the_key(make_settings) -> None:
    with pytest.raises(ConfigError, match="SECAGG="):
        make_settings(**{**BASE, "SECAGG": "maybe"})
    with pytest.raises(ConfigError, match="SECAGG_THRESHOLD="):
        make_settings(**{**BASE, "SECAGG_THRESHOLD": "-1"})
