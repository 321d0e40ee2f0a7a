"""Aggregation rules (`AGGREGATION`): how accepted client updates become the next global model.

One module per rule or family, the paper and formula in each class docstring;
the math as pure numpy functions in `aggregate.py`; the interface in `base.py`.
The registry (`fedsim.rules`) maps each rule's name to "module:Class" here and
the setting rows it reads; a rule's module is imported on first use (as pip's
command table), so importing this package imports no rule and no numpy: the
names below (`Global`, `FedAvg`, ...) are loaded when first asked for.

| name | module | mode |
|---|---|---|
| async-weighted, fedasync, fedbuff | asynchronous.py | async |
| fedavg, fedprox | fedavg.py | rounds |
| fedavgm, fedadam, fedyogi, fedadagrad | fedopt.py | rounds |
| median, trimmed-mean, krum | robust.py | rounds |
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedsim.rules import (
    AGGREGATION,
    REGISTRY,
    check,
    chosen,
    names,
    parse_name,
    rows_of,
    rule_class,
    rule_settings,
)

if TYPE_CHECKING:
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
    "check",
    "fedasync_mix",
    "names",
    "parse_name",
    "polynomial_staleness",
    "rows_of",
    "rule_class",
    "rule_settings",
    "weighted_mean",
    "weighted_merge",
]

# Names this package offers, by the module that defines them (imported when first asked for).
_LAZY = {
    "base": ("AsyncRule", "Global", "Refused", "RoundRule", "Strategy", "Update"),
    "aggregate": ("fedasync_mix", "polynomial_staleness", "weighted_mean", "weighted_merge"),
    "asynchronous": ("AsyncWeighted", "FedAsync"),
    "fedavg": ("FedAvg",),
}
_MODULE_OF = {name: module for module, found in _LAZY.items() for name in found}


def __getattr__(name: str) -> Any:
    """The interface, math and rule names above, each module imported on first use (PEP 562)."""
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build(settings: Any) -> Strategy:
    """The rule named by `AGGREGATION`, built from settings that `check` has passed.

    fedsim.config.load checks them once at start; the aggregator builds once.
    """
    return chosen(settings).from_settings(settings)
