"""The forms of the population's settings: how a value is spread over the logical clients.

`CLIENT_SPEED` and `CLIENT_BANDWIDTH` are a `Spread`: a number, `lognormal:MU,SIGMA`
(exp of a normal: mean exp(MU + SIGMA^2/2)), `uniform:LO,HI`, or
`slow:FRACTION,FACTOR[,BASE]` (a share of the clients FACTOR times slower than BASE);
`AVAILABILITY` is always, diurnal[:FRACTION] or trace:FILE. Each parser raises ValueError
saying what is allowed, which the settings turn into one line naming the key. The draws
themselves are `fedsim.data.population`'s. Only numpy here, so the settings table can
import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SPREAD_FORMS = "a number, lognormal:MU,SIGMA, uniform:LO,HI or slow:FRACTION,FACTOR[,BASE]"


@dataclass(frozen=True)
class Spread:
    """How a per-client value is spread over the clients (see the module docstring)."""

    kind: str  # "fixed", "lognormal", "uniform", "slow"
    args: tuple[float, ...]

    def __str__(self) -> str:
        shown = ",".join(f"{a:g}" for a in self.args)
        return shown if self.kind == "fixed" else f"{self.kind}:{shown}"

    def draw(self, n: int, rng: np.random.Generator, *, slower_divides: bool) -> np.ndarray:
        """n values, float64. `slower_divides`: a slow client's value is BASE / FACTOR
        (a rate, bandwidth) rather than BASE x FACTOR (a time multiplier, speed)."""
        if self.kind == "fixed":
            return np.full(n, self.args[0])
        if self.kind == "lognormal":
            return rng.lognormal(self.args[0], self.args[1], n)
        if self.kind == "uniform":
            return rng.uniform(self.args[0], self.args[1], n)
        fraction, factor, base = self.args
        out = np.full(n, base)
        slow = rng.choice(n, size=int(fraction * n + 0.5), replace=False)  # halves round up
        out[slow] = base / factor if slower_divides else base * factor
        return out


def _numbers(raw: str, count: tuple[int, ...]) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in raw.split(","))
    except ValueError:
        raise ValueError(f"{raw!r} is not numbers separated by commas") from None
    if len(values) not in count or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{raw!r} is not {' or '.join(map(str, count))} finite numbers")
    return values


def parse_spread(raw: str, *, base_needed: bool = False, infinite: bool = False) -> Spread:
    """A `Spread` from its setting's text; ValueError says what is allowed.

    `infinite`: a plain `inf` is allowed (bandwidth); `base_needed`: slow: takes three
    numbers (bandwidth has no natural base)."""
    text = raw.strip().lower()
    kind, colon, rest = text.partition(":")
    allowed = SPREAD_FORMS + (" (slow needs its BASE)" if base_needed else "")
    try:
        if not colon:
            value = float(text)
            if not (value > 0 and (math.isfinite(value) or infinite)):
                raise ValueError("must be > 0" + ("" if infinite else " and finite"))
            return Spread("fixed", (value,))
        if kind == "lognormal":
            mu, sigma = _numbers(rest, (2,))
            if sigma < 0:
                raise ValueError("SIGMA must be >= 0")
            return Spread(kind, (mu, sigma))
        if kind == "uniform":
            lo, hi = _numbers(rest, (2,))
            if not 0 < lo <= hi:
                raise ValueError("needs 0 < LO <= HI")
            return Spread(kind, (lo, hi))
        if kind == "slow":
            args = _numbers(rest, (3,) if base_needed else (2, 3))
            fraction, factor, base = (*args, 1.0) if len(args) == 2 else args
            if not 0 <= fraction <= 1 or factor < 1 or base <= 0:
                raise ValueError("needs 0 <= FRACTION <= 1, FACTOR >= 1 and BASE > 0")
            return Spread(kind, (fraction, factor, base))
    except ValueError as exc:
        raise ValueError(f"{allowed}: {exc}") from None
    raise ValueError(allowed)


def speed_setting(raw: str) -> str:
    """CLIENT_SPEED's parser: the spread, written back in one canonical form."""
    return str(parse_spread(raw))


def bandwidth_setting(raw: str) -> str:
    """CLIENT_BANDWIDTH's parser: bytes per second, `inf` or a spread with a BASE."""
    return str(parse_spread(raw, base_needed=True, infinite=True))


def availability_setting(raw: str) -> str:
    """AVAILABILITY's parser: always, diurnal[:F] with 0 < F <= 1, or trace:FILE."""
    text = raw.strip()
    kind, colon, rest = text.partition(":")
    kind = kind.lower()
    if kind == "always" and not colon:
        return "always"
    if kind == "diurnal":
        if not colon:
            return "diurnal"
        try:
            fraction = float(rest)
        except ValueError:
            fraction = math.nan
        if 0 < fraction <= 1:
            return f"diurnal:{fraction:g}"
    if kind == "trace" and rest.strip():
        return f"trace:{rest.strip()}"
    raise ValueError("always, diurnal[:FRACTION] (0 < FRACTION <= 1) or trace:FILE (a CSV)")
