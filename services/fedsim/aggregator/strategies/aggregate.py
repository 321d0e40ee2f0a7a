"""The aggregation math: small pure numpy functions, tested on hand-worked arrays.

Models are dicts of named float32 tensors of one layout. Sums over clients are
accumulated in float64, so the order of the clients does not change a result;
results are cast back to float32, the dtype that is served and saved. The
coordinate-wise rules (median, trimmed mean) and Krum's distances work through
the flattened tensors in column blocks of bounded size (`BLOCK_VALUES`), so 100
updates of the cnn do not need a 100 x 1.6M float64 copy at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

Tensors = Mapping[str, np.ndarray]
BLOCK_VALUES = 1 << 22  # float64 values per column block: 32 MiB


# --- means ----------------------------------------------------------------------------


def weighted_merge(
    global_w: Tensors, client_w: Tensors, *, a: int, b: int
) -> dict[str, np.ndarray]:
    """The running weighted mean: w = (a * w_global + b * w_client) / (a + b).

    Computed as w_global + b / (a + b) * (w_client - w_global): the same value,
    without a * w_global growing with the sample count. One new array per tensor, the
    steps made in it (every accepted update of the asynchronous rule runs this).
    """
    if a < 0 or b <= 0:
        raise ValueError(f"need a >= 0 and b > 0, got a={a}, b={b}")
    step = np.float32(b / (a + b))
    out = {}
    for name, g in global_w.items():
        w = np.subtract(client_w[name], g, dtype=np.float32)
        w *= step
        w += g
        out[name] = w
    return out


def weighted_mean(models: Sequence[Tensors], counts: Sequence[float]) -> dict[str, np.ndarray]:
    """FedAvg's aggregate: w = sum_k (n_k / n) * w_k, with n = sum_k n_k.

    Accumulated in float64 so the order of the clients does not change the result.
    """
    if not models:
        raise ValueError("no models to average")
    if len(models) != len(counts):
        raise ValueError(f"{len(models)} models but {len(counts)} counts")
    if any(not n_k > 0 for n_k in counts):
        raise ValueError(f"sample counts must be positive, got {list(counts)}")
    n = sum(counts)
    out: dict[str, np.ndarray] = {}
    for name in models[0]:
        acc = np.zeros(models[0][name].shape, dtype=np.float64)
        for w_k, n_k in zip(models, counts, strict=True):
            acc += (n_k / n) * w_k[name]
        out[name] = acc.astype(np.float32)
    return out


# --- staleness ------------------------------------------------------------------------


def polynomial_staleness(t: int, tau: int, *, a: float) -> float:
    """FedAsync's polynomial staleness function s(t - tau) = (t - tau + 1) ** -a.

    1 for a fresh update (tau = t) or a = 0, smaller the older the base version.
    A base ahead of t (a client that saw versions a resumed aggregator lost)
    counts as fresh.
    """
    if a < 0:
        raise ValueError(f"need a >= 0, got a={a}")
    return float((max(t - tau, 0) + 1) ** -a)


def fedasync_mix(global_w: Tensors, client_w: Tensors, *, alpha_t: float) -> dict[str, np.ndarray]:
    """FedAsync's update x_t = (1 - alpha_t) * x_{t-1} + alpha_t * x_new.

    Computed as x_{t-1} + alpha_t * (x_new - x_{t-1}), like `weighted_merge`.
    """
    if not 0 < alpha_t <= 1:
        raise ValueError(f"need 0 < alpha_t <= 1, got alpha_t={alpha_t}")
    return {
        name: (x + np.float32(alpha_t) * (client_w[name] - x)).astype(np.float32, copy=False)
        for name, x in global_w.items()
    }


def fedbuff_weight(staleness: int) -> float:
    """FedBuff's staleness weight s(tau) = 1 / sqrt(1 + tau) (Nguyen et al. 2022).

    tau is how many versions the update's base is behind; a base ahead counts as 0.
    """
    return 1.0 / math.sqrt(1 + max(staleness, 0))


# --- coordinate-wise robust statistics ------------------------------------------------


def _blocks(models: Sequence[Tensors], name: str) -> Iterator[tuple[slice, np.ndarray]]:
    """Column blocks of tensor `name` stacked over the models: (columns, [n, c] float64)."""
    flat = [np.asarray(m[name]).reshape(-1) for m in models]
    step = max(1, BLOCK_VALUES // len(flat))
    for start in range(0, flat[0].size, step):
        cols = slice(start, start + step)
        yield cols, np.stack([f[cols] for f in flat]).astype(np.float64)


def _coordinatewise(models: Sequence[Tensors], reduce) -> dict[str, np.ndarray]:
    if not models:
        raise ValueError("no models to aggregate")
    out: dict[str, np.ndarray] = {}
    for name, first in models[0].items():
        result = np.empty(first.size, dtype=np.float32)
        for cols, block in _blocks(models, name):
            result[cols] = reduce(block)  # block: [n, c] -> [c]
        out[name] = result.reshape(first.shape)
    return out


def coordinate_median(models: Sequence[Tensors]) -> dict[str, np.ndarray]:
    """The coordinate-wise median (Yin et al. 2018, arXiv:1803.01498, "median").

    For an even number of models, the mean of the two middle values.
    """
    return _coordinatewise(models, lambda block: np.median(block, axis=0))


def trim_count(n: int, beta: float) -> int:
    """How many values a beta-trimmed mean drops at each end of n: floor(beta * n)."""
    if not 0 <= beta < 0.5:
        raise ValueError(f"need 0 <= beta < 0.5, got beta={beta}")
    # The tolerance keeps 0.29 * 100 (28.999999999999996 in floats) at 29.
    return math.floor(beta * n + 1e-9)


def trimmed_mean(models: Sequence[Tensors], beta: float) -> dict[str, np.ndarray]:
    """The coordinate-wise beta-trimmed mean (Yin et al. 2018, arXiv:1803.01498).

    Per coordinate: sort the n values, drop k = floor(beta * n) at each end, and
    average the n - 2k left. beta < 0.5 always leaves at least one value.
    """
    k = trim_count(len(models), beta)
    return _coordinatewise(
        models, lambda block: np.sort(block, axis=0)[k : len(models) - k].mean(0)
    )


# --- Krum -----------------------------------------------------------------------------


def squared_distances(models: Sequence[Tensors]) -> np.ndarray:
    """[n, n] float64 matrix of squared Euclidean distances between the flattened models.

    Accumulated block by block as a Gram matrix (one BLAS product per block):
    |x_i - x_j|^2 = G_ii + G_jj - 2 G_ij, with G = X X^T over the values minus
    the first model's. The shift keeps G about as small as the distances, so the
    differences lose little precision (small integers come out exact).
    """
    n = len(models)
    if n == 0:
        raise ValueError("no models to compare")
    gram = np.zeros((n, n), dtype=np.float64)
    for name in models[0]:
        for _, block in _blocks(models, name):
            block -= block[0]
            gram += block @ block.T
    diag = np.diag(gram)
    dist = diag[:, None] + diag[None, :] - 2 * gram
    np.fill_diagonal(dist, 0.0)
    return np.maximum(dist, 0.0)


def krum_scores(models: Sequence[Tensors], f: int) -> np.ndarray:
    """Krum's scores (Blanchard et al. 2017): s(i) = sum of |x_i - x_j|^2 over the
    n - f - 2 models j != i closest to x_i. Needs n - f - 2 >= 1.
    """
    n = len(models)
    closest = n - f - 2
    if f < 0 or closest < 1:
        raise ValueError(f"krum needs n - f - 2 >= 1, got n={n}, f={f}")
    dist = squared_distances(models)
    scores = np.empty(n, dtype=np.float64)
    for i in range(n):
        others = np.delete(dist[i], i)
        scores[i] = np.sort(others)[:closest].sum()
    return scores


def krum_select(models: Sequence[Tensors], f: int, m: int) -> list[int]:
    """Indices of the m models with the lowest Krum scores, best first (ties: lower index).

    m = 1 is Krum; m > 1 is multi-Krum, whose output is the mean of these models.
    """
    if not 1 <= m <= len(models):
        raise ValueError(f"need 1 <= m <= n, got m={m}, n={len(models)}")
    scores = krum_scores(models, f)
    return [int(i) for i in np.argsort(scores, kind="stable")[:m]]


# --- server optimizers, per tensor (float64 in, float64 out) ---------------------------


def pseudo_gradient(current: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """FedAvgM's pseudo-gradient Delta = w_t - mean_k w_k (Hsu et al. 2019)."""
    return np.asarray(current, np.float64) - np.asarray(mean, np.float64)


def momentum(v: np.ndarray, delta: np.ndarray, beta: float) -> np.ndarray:
    """Server momentum v_t = beta * v_{t-1} + Delta_t (Hsu et al. 2019)."""
    return beta * np.asarray(v, np.float64) + delta


def first_moment(m: np.ndarray, delta: np.ndarray, beta1: float) -> np.ndarray:
    """m_t = beta1 * m_{t-1} + (1 - beta1) * Delta_t (Reddi et al. 2021, Algorithm 2)."""
    return beta1 * np.asarray(m, np.float64) + (1 - beta1) * delta


def adagrad_moment(v: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """FedAdagrad: v_t = v_{t-1} + Delta_t^2."""
    return np.asarray(v, np.float64) + np.square(delta)


def adam_moment(v: np.ndarray, delta: np.ndarray, beta2: float) -> np.ndarray:
    """FedAdam: v_t = beta2 * v_{t-1} + (1 - beta2) * Delta_t^2."""
    return beta2 * np.asarray(v, np.float64) + (1 - beta2) * np.square(delta)


def yogi_moment(v: np.ndarray, delta: np.ndarray, beta2: float) -> np.ndarray:
    """FedYogi: v_t = v_{t-1} - (1 - beta2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2)."""
    v = np.asarray(v, np.float64)
    sq = np.square(delta)
    return v - (1 - beta2) * sq * np.sign(v - sq)


def adaptive_step(
    x: np.ndarray, m: np.ndarray, v: np.ndarray, *, eta: float, tau: float
) -> np.ndarray:
    """x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau) (Reddi et al. 2021, Algorithm 2)."""
    m = np.asarray(m, np.float64)
    return np.asarray(x, np.float64) + eta * m / (np.sqrt(np.asarray(v, np.float64)) + tau)
