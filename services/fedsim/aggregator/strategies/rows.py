"""Setting rows shared by several rules, and the parsers the rules' rows use.

A row used by more than one rule is declared once here and listed in each rule's
`settings`; the registry gathers every rule's rows, each key once, for
`fedsim.config`. The parsers raise ValueError saying what is allowed, worded as
config's own ("a number > 0"), so every bad value reads the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from fedsim.config import Setting


def number(
    lo: float, hi: float | None = None, *, above: bool = False, below: bool = False
) -> Callable[[str], float]:
    """A finite float in [lo, hi]; `above`/`below` exclude lo/hi."""
    allowed = f"a number {'>' if above else '>='} {lo:g}"
    if hi is not None:
        allowed += f" and {'<' if below else '<='} {hi:g}"

    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(allowed) from None
        if not math.isfinite(value) or value < lo or (above and value == lo):
            raise ValueError(allowed)
        if hi is not None and (value > hi or (below and value == hi)):
            raise ValueError(allowed)
        return value

    return parse


def integer(lo: int) -> Callable[[str], int]:
    """An integer >= lo."""
    allowed = f"an integer >= {lo}"

    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(allowed) from None
        if value < lo:
            raise ValueError(allowed)
        return value

    return parse


# 0 means "the rule's own": the good step size differs by rule (an adaptive step is
# normalised per coordinate, a momentum step is not), and one key keeps the story short.
SERVER_LEARNING_RATE = Setting(
    "SERVER_LEARNING_RATE",
    "0",
    number(0),
    "fedavgm, fedadam, fedyogi, fedadagrad, fedbuff: the server's step size eta; 0: the rule's"
    " own (fedavgm 1, fedadam 0.03, fedyogi 0.03, fedadagrad 0.1, fedbuff 1)",
)
