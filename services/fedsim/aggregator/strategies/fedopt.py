"""Server optimizers: the round's mean update taken as a pseudo-gradient.

- `fedavgm`: server momentum (Hsu, Qi, Brown 2019).
- `fedadam`, `fedyogi`, `fedadagrad`: adaptive server steps (Reddi et al. 2021).

Each keeps per-tensor state (momentum; first and second moments) as float32
tensors, which the aggregator saves beside the model in every checkpoint; a step
reads the stored float32 values and computes in float64, so a run resumed from a
checkpoint takes the same steps, bit for bit, as one that never stopped. The
round mean is sample-weighted, as FedAvg's (Reddi et al.'s Algorithm 2 averages
the clients equally; with equal counts the two agree).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Self

import numpy as np

from fedsim.aggregator.strategies.aggregate import (
    adagrad_moment,
    adam_moment,
    adaptive_step,
    first_moment,
    momentum,
    pseudo_gradient,
    yogi_moment,
)
from fedsim.aggregator.strategies.base import Global, Update, check_like, pack, unpack, value
from fedsim.aggregator.strategies.fedavg import FedAvg
from fedsim.rules import (
    SERVER_BETA1,
    SERVER_BETA2,
    SERVER_LEARNING_RATE,
    SERVER_MOMENTUM,
    SERVER_TAU,
)


def _load_rounds(state: Mapping[str, Any], rule: str) -> int:
    rounds = state.get("rounds", 0)
    if type(rounds) is not int or rounds < 0:
        raise ValueError(f"{rule} state 'rounds' must be an integer >= 0, got {rounds!r}")
    return rounds


class FedAvgM(FedAvg):
    """FedAvgM (Hsu, Qi, Brown 2019, arXiv:1909.06335): FedAvg with server momentum.

    The round's sample-weighted mean gives the pseudo-gradient
    Delta_t = w_t - sum_k (n_k / n) w_k; then v_t = beta * v_{t-1} + Delta_t
    (v_{-1} = 0) and w_{t+1} = w_t - eta * v_t. beta = 0 and eta = 1 is FedAvg.
    The paper finds the effective step eta / (1 - beta) is what matters.
    """

    name = "fedavgm"
    default_eta: ClassVar[float] = 1.0

    def __init__(self, *, eta: float, beta: float) -> None:
        if not eta > 0 or not 0 <= beta < 1:
            raise ValueError(f"bad fedavgm settings: {eta=}, {beta=}")
        self.eta, self.beta = eta, beta
        self._v: dict[str, np.ndarray] = {}  # float32; {} before the first round
        self.rounds = 0

    @classmethod
    def from_settings(cls, settings: Any) -> Self:
        eta = value(settings, SERVER_LEARNING_RATE.key) or cls.default_eta
        return cls(eta=eta, beta=value(settings, SERVER_MOMENTUM.key))

    def combine(self, current: Global, updates: Sequence[Update]) -> dict[str, np.ndarray]:
        mean = super().combine(current, updates)
        if self._v:
            check_like(self._v, current.tensors, "the fedavgm momentum")
        out, v_new = {}, {}
        for name, w in current.tensors.items():
            delta = pseudo_gradient(w, mean[name])
            v_new[name] = momentum(self._v.get(name, 0.0), delta, self.beta).astype(np.float32)
            out[name] = (w - self.eta * v_new[name].astype(np.float64)).astype(np.float32)
        self._v, self.rounds = v_new, self.rounds + 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rounds = _load_rounds(state, self.name)

    def tensor_state(self) -> dict[str, np.ndarray]:
        return pack({"momentum": self._v}) if self._v else {}

    def load_tensor_state(self, tensors: Mapping[str, np.ndarray]) -> None:
        slots = unpack(tensors, ("momentum",))
        self._v = {n: t.copy() for n, t in slots.get("momentum", {}).items()}


class FedOpt(FedAvg):
    """Adaptive federated optimization (Reddi et al., ICLR 2021, arXiv:2003.00295, Algorithm 2).

    The round's mean client delta Delta_t = sum_k (n_k / n) w_k - w_t drives a
    server optimizer: m_t = beta1 * m_{t-1} + (1 - beta1) * Delta_t, v_t by the
    subclass's `second_moment`, and x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau).
    m_{-1} = 0 and v_{-1} = tau^2 (the paper asks v_{-1} >= tau^2). No bias
    correction, as in the paper. tau bounds the step where v is small: the
    smaller tau, the more adaptive.
    """

    default_eta: ClassVar[float]
    uses_beta2: ClassVar[bool] = True  # Adagrad's second moment has no decay

    def __init__(self, *, eta: float, beta1: float, beta2: float, tau: float) -> None:
        if not eta > 0 or not 0 <= beta1 < 1 or not 0 <= beta2 < 1 or not tau > 0:
            raise ValueError(f"bad {self.name} settings: {eta=}, {beta1=}, {beta2=}, {tau=}")
        self.eta, self.beta1, self.beta2, self.tau = eta, beta1, beta2, tau
        self._m: dict[str, np.ndarray] = {}  # float32; {} before the first round
        self._v: dict[str, np.ndarray] = {}
        self.rounds = 0

    @classmethod
    def from_settings(cls, settings: Any) -> Self:
        return cls(
            eta=value(settings, SERVER_LEARNING_RATE.key) or cls.default_eta,
            beta1=value(settings, SERVER_BETA1.key),
            beta2=value(settings, SERVER_BETA2.key) if cls.uses_beta2 else 0.0,
            tau=value(settings, SERVER_TAU.key),
        )

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def combine(self, current: Global, updates: Sequence[Update]) -> dict[str, np.ndarray]:
        mean = super().combine(current, updates)
        if self._m:
            check_like(self._m, current.tensors, f"the {self.name} moments")
        out, m_new, v_new = {}, {}, {}
        for name, x in current.tensors.items():
            delta = -pseudo_gradient(x, mean[name])  # mean - x: the clients' direction
            m_new[name] = first_moment(self._m.get(name, 0.0), delta, self.beta1).astype(np.float32)
            v_prev = self._v.get(name, np.float64(self.tau) ** 2)
            v_new[name] = self.second_moment(v_prev, delta).astype(np.float32)
            step = adaptive_step(x, m_new[name], v_new[name], eta=self.eta, tau=self.tau)
            out[name] = step.astype(np.float32)
        self._m, self._v, self.rounds = m_new, v_new, self.rounds + 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rounds = _load_rounds(state, self.name)

    def tensor_state(self) -> dict[str, np.ndarray]:
        return pack({"m": self._m, "v": self._v}) if self._m else {}

    def load_tensor_state(self, tensors: Mapping[str, np.ndarray]) -> None:
        slots = unpack(tensors, ("m", "v"))
        if any((t < 0).any() for t in slots.get("v", {}).values()):
            raise ValueError(f"{self.name} second moment v must be >= 0")
        self._m = {n: t.copy() for n, t in slots.get("m", {}).items()}
        self._v = {n: t.copy() for n, t in slots.get("v", {}).items()}


class FedAdam(FedOpt):
    """FedAdam (Reddi et al., ICLR 2021, arXiv:2003.00295): FedOpt with Adam's second moment.

    v_t = beta2 * v_{t-1} + (1 - beta2) * Delta_t^2; x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau).
    """

    name = "fedadam"
    default_eta = 0.03

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return adam_moment(v, delta, self.beta2)


class FedYogi(FedOpt):
    """FedYogi (Reddi et al., ICLR 2021, arXiv:2003.00295): FedOpt with Yogi's second moment.

    v_t = v_{t-1} - (1 - beta2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2): v moves by
    at most (1 - beta2) Delta_t^2 a round, so it grows and shrinks more slowly
    than Adam's. x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau).
    """

    name = "fedyogi"
    default_eta = 0.03

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return yogi_moment(v, delta, self.beta2)


class FedAdagrad(FedOpt):
    """FedAdagrad (Reddi et al., ICLR 2021, arXiv:2003.00295): FedOpt with Adagrad's moment.

    v_t = v_{t-1} + Delta_t^2 (no beta2): the step shrinks as squared deltas add
    up. x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau).
    """

    name = "fedadagrad"
    uses_beta2 = False
    default_eta = 0.1

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return adagrad_moment(v, delta)
