"""Epsilon computed independently of fedsim, for checking aggregator/privacy.py against."""

from __future__ import annotations

import dp_accounting
from dp_accounting.rdp import RdpAccountant


def composed_epsilon(clients: int, per_round: int, z: float, rounds: int, delta: float) -> float:
    """Epsilon composed one round at a time with dp-accounting: the sum of m clipped deltas
    moves by 2S when one client is replaced, so the Gaussian's multiplier relative to it is
    z / 2."""
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for _ in range(rounds):
        accountant.compose(
            dp_accounting.SampledWithoutReplacementDpEvent(
                clients, per_round, dp_accounting.GaussianDpEvent(z / 2)
            )
        )
    return accountant.get_epsilon(delta)
