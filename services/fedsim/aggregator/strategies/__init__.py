"""Aggregation rules (`AGGREGATION`): how accepted client updates become the next global model.

One module per rule or family, the paper and formula in each class docstring;
the math as pure numpy functions in `aggregate.py`; the interface in `base.py`.
`REGISTRY` maps each rule's name to "module:Class", imported on first use (as
pip's command table); the `AGGREGATION` choices and every rule's setting rows
come from it, so adding a rule is one module and one line here.

| name | module | mode |
|---|---|---|
| async-weighted, fedasync, fedbuff | asynchronous.py | async |
| fedavg, fedprox | fedavg.py | rounds |
| fedavgm, fedadam, fedyogi, fedadagrad | fedopt.py | rounds |
| median, trimmed-mean, krum | robust.py | rounds |
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from fedsim.aggregator.strategies.aggregate import (
    fedasync_mix,
    polynomial_staleness,
    weighted_mean,
    weighted_merge,
)
from fedsim.aggregator.strategies.asynchronous import AsyncWeighted, FedAsync
from fedsim.aggregator.strategies.base import (
    AsyncRule,
    Global,
    Refused,
    RoundRule,
    Strategy,
    Update,
)
from fedsim.aggregator.strategies.fedavg import FedAvg
from fedsim.config import ConfigError, Setting

__all__ = [
    "AGGREGATION",
    "REGISTRY",
    "AsyncRule",
    "AsyncWeighted",
    "FedAsync",
    "FedAvg",
    "Global",
    "Refused",
    "RoundRule",
    "Strategy",
    "Update",
    "build",
    "fedasync_mix",
    "names",
    "parse_name",
    "polynomial_staleness",
    "rule_class",
    "rule_settings",
    "weighted_mean",
    "weighted_merge",
]

REGISTRY: dict[str, str] = {
    "async-weighted": "asynchronous:AsyncWeighted",
    "fedasync": "asynchronous:FedAsync",
    "fedbuff": "asynchronous:FedBuff",
    "fedavg": "fedavg:FedAvg",
    "fedprox": "fedavg:FedProx",
    "fedavgm": "fedopt:FedAvgM",
    "fedadam": "fedopt:FedAdam",
    "fedyogi": "fedopt:FedYogi",
    "fedadagrad": "fedopt:FedAdagrad",
    "median": "robust:Median",
    "trimmed-mean": "robust:TrimmedMean",
    "krum": "robust:Krum",
}


def names() -> tuple[str, ...]:
    """Every rule's name, in the registry's order (the `AGGREGATION` choices)."""
    return tuple(REGISTRY)


def parse_name(raw: str) -> str:
    """`AGGREGATION`'s parser: a rule's name, any case; ValueError with a suggestion."""
    name = raw.strip().lower()
    if name in REGISTRY:
        return name
    allowed = "one of " + ", ".join(REGISTRY)
    close = difflib.get_close_matches(name, REGISTRY, n=1)
    raise ValueError(allowed + (f" (did you mean {close[0]}?)" if close else ""))


def rule_class(name: str) -> type[Strategy]:
    """The class registered as `name`, its module imported on first use."""
    module, cls = REGISTRY[parse_name(name)].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def rule_settings() -> tuple[Setting, ...]:
    """Every rule's setting rows, each key once, in registry order (for fedsim.config)."""
    rows: dict[str, Setting] = {}
    for name in REGISTRY:
        for row in rule_class(name).settings:
            if rows.setdefault(row.key, row) is not row:
                raise RuntimeError(f"setting {row.key} is declared twice: share one row")
    return tuple(rows.values())


AGGREGATION = Setting(
    "AGGREGATION",
    "async-weighted",
    parse_name,
    "the aggregation rule: " + ", ".join(REGISTRY) + " (see the README's table of rules)",
)


def build(settings: Any) -> Strategy:
    """The rule named by `AGGREGATION`, built and checked against the other settings."""
    try:
        cls = rule_class(settings.aggregation)
    except ValueError as exc:
        raise ConfigError("AGGREGATION", settings.aggregation, str(exc)) from None
    return cls.from_settings(settings)
