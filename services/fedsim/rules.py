"""The aggregation rules' registry: each rule's name, where its class lives, the rows it reads.

As pip's command table keeps each command's summary beside its module path, an
entry keeps a rule's setting rows beside "module:Class" (a module of
`fedsim.aggregator.strategies`), so the settings table, read by every process,
is built without importing any rule, numpy or the aggregator. A rule's class is
imported on first use, by `rule_class`. A row shared by several rules is
declared once here and listed in each of their entries.

Adding a rule: its module in fedsim/aggregator/strategies/, its rows and one
`REGISTRY` line here, its tests, then `python -m fedsim.settings_docs --write`.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, NamedTuple

from fedsim.settings import ConfigError, Setting, integer, number

PACKAGE = "fedsim.aggregator.strategies"  # where the rules' modules are

# --- asynchronous.py -------------------------------------------------------------------

FEDASYNC_ALPHA = Setting(
    "FEDASYNC_ALPHA",
    "0.5",
    number(0, 1, above=True),
    "fedasync: mixing rate alpha of a fresh update; 0.5 scored like 0.8 and above 0.3 in the default"
    " run",
)
FEDASYNC_STALENESS = Setting(
    "FEDASYNC_STALENESS",
    "0.5",
    number(0),
    "fedasync: staleness exponent a in alpha * (t - tau + 1) ** -a; 0.5 as in the paper, 0: constant",
)
FEDBUFF_K = Setting(
    "FEDBUFF_K",
    "10",
    integer(1),
    "fedbuff: updates buffered before the server steps (the paper's K)",
)
# 0 means "the rule's own": the good step size differs by rule (an adaptive step is
# normalised per coordinate, a momentum step is not), and one key keeps the story short.
SERVER_LEARNING_RATE = Setting(
    "SERVER_LEARNING_RATE",
    "0",
    number(0),
    "fedavgm, fedadam, fedyogi, fedadagrad, fedbuff: the server's step size eta; 0: the rule's"
    " own (fedavgm 1, fedadam 0.03, fedyogi 0.03, fedadagrad 0.1, fedbuff 1)",
)

# --- fedavg.py -------------------------------------------------------------------------

FEDPROX_MU = Setting(
    "FEDPROX_MU",
    "0.01",
    number(0),
    "fedprox: weight mu of the clients' proximal term (mu/2) * norm(w - w_t)^2; 0.01 is in the"
    " paper's grid {0.001, 0.01, 0.1, 1}",
)

# --- fedopt.py -------------------------------------------------------------------------

SERVER_MOMENTUM = Setting(
    "SERVER_MOMENTUM",
    "0.9",
    number(0, 1, below=True),
    "fedavgm: server momentum beta on the pseudo-gradient; 0.9 is in Hsu et al.'s grid",
)
SERVER_BETA1 = Setting(
    "SERVER_BETA1",
    "0.9",
    number(0, 1, below=True),
    "fedadam, fedyogi, fedadagrad: decay beta1 of the first moment m; 0.9 as in Reddi et al.",
)
SERVER_BETA2 = Setting(
    "SERVER_BETA2",
    "0.99",
    number(0, 1, below=True),
    "fedadam, fedyogi: decay beta2 of the second moment v; 0.99 as in Reddi et al.",
)
SERVER_TAU = Setting(
    "SERVER_TAU",
    "0.001",
    number(0, above=True),
    "fedadam, fedyogi, fedadagrad: adaptivity tau in m / (sqrt(v) + tau); 1e-3 as in Reddi et al.",
)

# --- robust.py -------------------------------------------------------------------------

TRIM_BETA = Setting(
    "TRIM_BETA",
    "0.1",
    number(0, 0.5, above=True, below=True),
    "trimmed-mean: fraction beta of each coordinate's values dropped at each end; at least"
    " the fraction of attackers expected",
)
KRUM_F = Setting(
    "KRUM_F",
    "1",
    integer(0),
    "krum: attackers f a round tolerates; a round needs n > 2f + 2 updates",
)
KRUM_M = Setting(
    "KRUM_M",
    "1",
    integer(1),
    "krum: updates averaged (multi-Krum); 1 is Krum, which keeps the single best-scored one",
)


class Entry(NamedTuple):
    """Where a rule lives ("module:Class" in PACKAGE) and the setting rows it reads."""

    path: str
    rows: tuple[Setting, ...] = ()


_ADAPTIVE = (SERVER_LEARNING_RATE, SERVER_BETA1, SERVER_BETA2, SERVER_TAU)

REGISTRY: dict[str, Entry] = {
    "async-weighted": Entry("asynchronous:AsyncWeighted"),
    "fedasync": Entry("asynchronous:FedAsync", (FEDASYNC_ALPHA, FEDASYNC_STALENESS)),
    "fedbuff": Entry("asynchronous:FedBuff", (FEDBUFF_K, SERVER_LEARNING_RATE)),
    "fedavg": Entry("fedavg:FedAvg"),
    "fedprox": Entry("fedavg:FedProx", (FEDPROX_MU,)),
    "fedavgm": Entry("fedopt:FedAvgM", (SERVER_LEARNING_RATE, SERVER_MOMENTUM)),
    "fedadam": Entry("fedopt:FedAdam", _ADAPTIVE),
    "fedyogi": Entry("fedopt:FedYogi", _ADAPTIVE),
    "fedadagrad": Entry("fedopt:FedAdagrad", (SERVER_LEARNING_RATE, SERVER_BETA1, SERVER_TAU)),
    "median": Entry("robust:Median"),
    "trimmed-mean": Entry("robust:TrimmedMean", (TRIM_BETA,)),
    "krum": Entry("robust:Krum", (KRUM_F, KRUM_M)),
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


def rows_of(name: str) -> tuple[Setting, ...]:
    """The setting rows the rule `name` reads."""
    return REGISTRY[parse_name(name)].rows


def rule_settings() -> tuple[Setting, ...]:
    """Every rule's setting rows, each key once, in registry order (for the settings table)."""
    rows: dict[str, Setting] = {}
    for entry in REGISTRY.values():
        for row in entry.rows:
            if rows.setdefault(row.key, row) is not row:
                raise RuntimeError(f"setting {row.key} is declared twice: share one row")
    return tuple(rows.values())


AGGREGATION = Setting(
    "AGGREGATION",
    "async-weighted",
    parse_name,
    "the aggregation rule: " + ", ".join(REGISTRY) + " (docs/design.md: the table of rules)",
)


def rule_class(name: str) -> type:
    """The class (a `Strategy`) registered as `name`, its module imported on first use."""
    module, cls = REGISTRY[parse_name(name)].path.split(":")
    return getattr(importlib.import_module(f"{PACKAGE}.{module}"), cls)


def chosen(settings: Any) -> type:
    """The class `AGGREGATION` names; ConfigError for an unknown name."""
    try:
        return rule_class(settings.aggregation)
    except ValueError as exc:
        raise ConfigError("AGGREGATION", settings.aggregation, str(exc)) from None


def check(settings: Any) -> None:
    """Refuse settings the chosen rule cannot run under; fedsim.config.load calls it once."""
    chosen(settings).check(settings)
