"""Robust round rules: aggregates that a few malicious updates cannot move far.

They treat every update alike, whatever its sample count: a count is the
client's own claim, and weighting by it would let one attacker claim a large one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Self

import numpy as np

from fedsim.aggregator.strategies.aggregate import (
    coordinate_median,
    krum_select,
    trimmed_mean,
    weighted_mean,
)
from fedsim.aggregator.strategies.base import Global, RoundRule, Update, value
from fedsim.rules import KRUM_F, KRUM_M, TRIM_BETA


class Median(RoundRule):
    """Coordinate-wise median (Yin, Chen, Ramchandran, Bartlett, ICML 2018, arXiv:1803.01498).

    w_{t+1}[j] = median_k w_k[j] for every coordinate j: as long as fewer than
    half of a round's updates are bad, each coordinate lies within the range of
    the good ones.
    """

    name = "median"

    def combine(self, current: Global, updates: Sequence[Update]) -> dict[str, np.ndarray]:
        return coordinate_median([u.tensors for u in updates])


class TrimmedMean(RoundRule):
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018, arXiv:1803.01498).

    For every coordinate j, sort the round's n values w_k[j], drop the
    k = floor(beta * n) largest and smallest, and average the n - 2k left.
    Tolerates up to k bad updates per round. `check` refuses a beta that
    trims nothing from a full round; a round closed short at ROUND_DEADLINE trims
    floor(beta * n) of what it has, possibly none.
    """

    name = "trimmed-mean"

    def __init__(self, *, beta: float) -> None:
        if not 0 < beta < 0.5:
            raise ValueError(f"bad trimmed-mean settings: {beta=}")
        self.beta = beta

    @classmethod
    def check(cls, settings: Any) -> None:
        beta = value(settings, TRIM_BETA.key)
        need = math.ceil(1 / beta - 1e-9)  # the smallest n with floor(beta * n) >= 1
        q = settings.round_quorum
        # beta = 1/q trims one from q updates; beta < 0.5 needs q >= 3.
        fix = f"raise TRIM_BETA to at least {math.ceil(1000 / q) / 1000:g}" if q >= 3 else None
        cls.require_round(
            settings,
            need,
            TRIM_BETA.key,
            f"TRIM_BETA={beta:g} trims nothing from a round of fewer than {need} updates",
            fix,
        )

    @classmethod
    def from_settings(cls, settings: Any) -> Self:
        return cls(beta=value(settings, TRIM_BETA.key))

    def combine(self, current: Global, updates: Sequence[Update]) -> dict[str, np.ndarray]:
        return trimmed_mean([u.tensors for u in updates], self.beta)


class Krum(RoundRule):
    """Krum and multi-Krum (Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017).

    For each of the round's n updates, score(i) = sum of |w_i - w_j|^2 over the
    n - f - 2 updates j closest to it; Krum keeps the update with the lowest
    score, multi-Krum averages the m lowest-scored ones (unweighted). Sound for
    f attackers when n > 2f + 2; a round closed short at ROUND_DEADLINE with
    fewer is refused (no new version), and m is capped at n - f.
    Cost: O(n^2 d) for n updates of d parameters (all pairwise distances).
    """

    name = "krum"

    def __init__(self, *, f: int, m: int) -> None:
        if f < 0 or m < 1:
            raise ValueError(f"bad krum settings: {f=}, {m=}")
        self.f, self.m = f, m
        self.min_updates = 2 * f + 3

    @classmethod
    def check(cls, settings: Any) -> None:
        f, m = value(settings, KRUM_F.key), value(settings, KRUM_M.key)
        cls.require_round(
            settings,
            2 * f + 3,
            KRUM_F.key,
            f"KRUM_F={f} needs at least {2 * f + 3} updates per round (n > 2f + 2)",
            "lower KRUM_F",
        )
        cls.require_round(
            settings,
            m + f,
            KRUM_M.key,
            f"KRUM_M={m} with KRUM_F={f} needs at least {m + f} updates per round (m <= n - f)",
            "lower KRUM_M",
        )

    @classmethod
    def from_settings(cls, settings: Any) -> Self:
        return cls(f=value(settings, KRUM_F.key), m=value(settings, KRUM_M.key))

    def combine(self, current: Global, updates: Sequence[Update]) -> dict[str, np.ndarray]:
        models = [u.tensors for u in updates]
        chosen = krum_select(models, self.f, min(self.m, len(models) - self.f))
        return weighted_mean([models[i] for i in chosen], [1] * len(chosen))
