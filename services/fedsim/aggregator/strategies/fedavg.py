"""Federated Averaging and FedProx: the round's sample-weighted mean.

FedProx changes only the clients' training (a proximal term), so on the server
it is FedAvg plus the μ it sends in every training task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

import numpy as np

from fedsim.aggregator.strategies.aggregate import weighted_mean
from fedsim.aggregator.strategies.base import Global, RoundRule, Update, value
from fedsim.rules import FEDPROX_MU


class FedAvg(RoundRule):
    """Federated Averaging (McMahan et al. 2017, arXiv:1602.05629, Algorithm 1).

    Each round t, C sampled clients train from w_t; the new model is the mean of
    their models weighted by their sample counts: w_{t+1} = sum_k (n_k / n) w_k,
    n = sum_k n_k.
    """

    name = "fedavg"

    def combine(self, current: Global, updates: Sequence[Update]) -> dict[str, np.ndarray]:
        return weighted_mean([u.tensors for u in updates], [u.num_samples for u in updates])


class FedProx(FedAvg):
    """FedProx (Li et al., MLSys 2020, arXiv:1812.06127, Algorithm 2).

    Client k minimises h_k(w; w_t) = F_k(w) + (mu / 2) * |w - w_t|^2 from the
    round's global model w_t; the proximal term keeps local models near w_t on
    heterogeneous data. The server aggregates as FedAvg, w_{t+1} = sum_k
    (n_k / n) w_k, and sends mu in each training task (`client_settings`);
    mu = 0 is FedAvg.
    """

    name = "fedprox"

    def __init__(self, *, mu: float) -> None:
        if not mu >= 0:
            raise ValueError(f"bad fedprox settings: {mu=}")
        self.mu = mu

    @classmethod
    def from_settings(cls, settings: Any) -> Self:
        return cls(mu=value(settings, FEDPROX_MU.key))

    def client_settings(self) -> dict[str, Any]:
        return {"proximal_mu": self.mu}
