"""Differential privacy's noise and its settings check: DP-FedAvg's central Gaussian on the mean.

DP=central (McMahan et al. 2018, arXiv:1710.06963): a round's m clipped deltas
(the clip stage re-checks them against the round's model) are averaged with
equal weights, and Gaussian noise of std z x S / m (z = DP_NOISE, S = DP_CLIP) is
added to the mean. The mean of m deltas each of norm <= S moves by at most
2S / m when one client's update is replaced by another's; the accountant
(fedsim.aggregator.privacy) is told so.

Equal weights, not sample counts: a count-weighted mean lets one client with a
large (claimed) count move the mean by up to S, not S / m, so the noise would no
longer cover it, and the count itself would be released without noise.

The stage first clips every update of the round again against the round's model,
whatever DP_CLIP_AT says (the bound never rests on a worker), and with
DP_CLIP_QUANTILE moves the clip norm (adaptive clipping, `CentralNoise`).

Where the noise goes: the `gather` side, before the rule. The stage replaces each
of the round's updates with w_t + noised mean, so whatever averaging rule runs
next (fedavg, fedprox, and the server optimizers fedavgm, fedadam, fedyogi,
fedadagrad) takes the mean of m equal models, which is the noised mean whatever
its weights: a server optimizer steps on the noised average, and the rule, the
state and the task queue need not know about DP. The batch keeps one entry per
update, so the ledger still credits each client.

DP=local: each worker adds N(0, (z S)^2) per weight to its own clipped delta
(`noise.local_noise`, called by the clip stage); the aggregator averages the noised
updates with equal weights and adds nothing.

The noise is secret. A worker's local noise comes from the operating system's
entropy, unseeded: the aggregator, which knows every task's seed, cannot redraw
it. The central noise of round r comes from HMAC-SHA256(key, r), the key 32
random bytes in MODEL_DIR/dp.key (`noise_key`: made by the aggregator on first
use, mode 0600, never served or logged), so a resumed run adds the same noise
as an unbroken one, and nobody without the key can predict it (docs/privacy.md).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

from fedsim.checkpoints import write_atomic
from fedsim.pipeline.base import Stage, Tensors
from fedsim.pipeline.clip import SLACK, clipped_weights
from fedsim.pipeline.noise import noised_mean
from fedsim.settings import ConfigError

log = logging.getLogger("fedsim.pipeline")

ROBUST = ("median", "trimmed-mean", "krum")  # not averages: noise on the mean does not bound them
KEY_FILE = "dp.key"  # in MODEL_DIR: the secret the central noise is drawn from


def noise_key(model_dir: Path) -> bytes:
    """The central noise's key, MODEL_DIR/dp.key (64 hex digits), made on first use with
    mode 0600. Raises ValueError, naming the file, when it is there but not a key."""
    path = Path(model_dir) / KEY_FILE
    try:
        text = path.read_bytes().decode("ascii").strip()
    except FileNotFoundError:
        key = secrets.token_bytes(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, key.hex().encode() + b"\n")  # mkstemp: mode 0600 from creation
        return key
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} cannot be read ({exc})") from None
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(
            f"{path} is not a key (64 hex digits): restore it from a backup, or delete it "
            "and a new key will draw the noise of every round made from now on"
        )
    return bytes.fromhex(text)


def noise_seed(key: bytes, round_no: int) -> int:
    """The seed of round `round_no`'s central noise: HMAC-SHA256(key, round), 256 bits."""
    mac = hmac.new(key, f"fedsim central noise, round {round_no}".encode(), hashlib.sha256)
    return int.from_bytes(mac.digest(), "big")


def params_of(settings: Any) -> dict[str, Any]:
    """The DP settings epsilon rests on, as a checkpoint saves them: a run resumes only with
    the same (aggregator/restore.py). Adaptive clipping is on when quantile > 0."""
    return {
        "mode": settings.dp,
        "clients": settings.logical_clients,
        "per_round": settings.per_round,
        "noise": settings.dp_noise,
        "delta": settings.delta,
        "clip_at": settings.dp_clip_at,
        "quantile": settings.dp_clip_quantile,
    }


def noise_on_updates(noise: float, count_noise: float) -> float:
    """Adaptive clipping's multiplier on the updates, z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2:
    with the count's noise sigma_b it is one Gaussian mechanism of multiplier z (Andrew et al.
    2021, Theorem 1), so the accountant is told z as without adaptive clipping."""
    if noise == 0:
        return 0.0
    if not 2 * count_noise > noise:
        raise ValueError(
            f"the count's noise {count_noise:g} must exceed DP_NOISE / 2 = {noise / 2:g}"
        )
    return float((noise**-2 - (2 * count_noise) ** -2) ** -0.5)


class CentralNoise(Stage):
    """On a round's gather: every update clipped again against the round's model, the
    equal-weight mean, the noise; with DP_CLIP_QUANTILE, the next round's clip norm.

    The clip re-check is here, not in the clip stage, because it needs the round's model
    (and, adaptive, the clip norm this stage keeps). With DP_CLIP_AT=worker an update
    found over the norm (beyond rounding) is clipped, not refused, and logged: it is
    checked when its round closes, after the update was acknowledged; clipping it keeps
    the sensitivity bound, which is all the guarantee needs, and keeps the round's m.

    Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private
    Learning with Adaptive Clipping", NeurIPS 2021, arXiv:1905.03871): with clip norm C
    this round, b_k = 1 when update k's norm is <= C; the noisy fraction
    b = (sum_k b_k + N(0, sigma_b^2)) / m moves the norm geometrically towards the
    quantile gamma: C <- C exp(-eta (b - gamma)). The updates' noise uses z_delta
    (`noise_on_updates`), so both releases together cost what z alone would. C is the
    stage's state, saved with every checkpoint, beside the DP settings in force (`params`).

    The noise of round r is drawn from `noise_seed(key, r)`, the key read from (or, the
    first time, made in) `model_dir` when a round first needs it: a worker, which builds
    this stage too, never reads it.
    """

    name = "dp"

    def __init__(
        self,
        mode: str,
        bound: float,
        noise: float,
        model_dir: Path,
        *,
        at: str = "aggregator",
        quantile: float = 0.0,
        rate: float = 0.2,
        count_noise: float = 0.0,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        self.mode, self.bound, self.noise, self.at = mode, bound, noise, at
        self.quantile, self.rate, self.count_noise = quantile, rate, count_noise
        self.model_dir, self._key = Path(model_dir), b""  # the key: read on first use
        self.params = dict(params or {})  # the DP settings in force, saved with the state
        self.clip_norm = bound  # this round's clip norm C (adaptive: moves every round)
        self.over_norm = 0  # updates found over the norm with DP_CLIP_AT=worker (not saved)

    @classmethod
    def from_settings(cls, settings: Any) -> Self | None:
        if getattr(settings, "dp", "off") == "off":
            return None
        return cls(
            settings.dp,
            settings.dp_clip,
            settings.dp_noise,
            settings.model_dir,
            at=settings.dp_clip_at,
            quantile=settings.dp_clip_quantile,
            rate=settings.dp_clip_lr,
            count_noise=settings.count_noise,
            params=params_of(settings),
        )

    def key(self) -> bytes:
        """The central noise's secret key (`noise_key`), read once. Raises ValueError."""
        if not self._key:
            self._key = noise_key(self.model_dir)
        return self._key

    @property
    def adaptive(self) -> bool:
        return self.mode == "central" and self.quantile > 0

    def std(self, m: int) -> float:
        """The central noise's std on the mean of m updates: z S / m (0 under DP=local);
        adaptive: z_delta C / m."""
        if self.mode != "central":
            return 0.0
        z = noise_on_updates(self.noise, self.count_noise) if self.adaptive else self.noise
        return z * self.clip_norm / m

    def gather(self, batch: Sequence[Tensors], base: Tensors, round_no: int) -> Sequence[Tensors]:
        if self.mode != "central":  # DP=local: the workers noised; the equal-weight mean
            return [noised_mean(batch, base, 0.0, np.random.default_rng())] * len(batch)
        rng = np.random.default_rng(noise_seed(self.key(), round_no))
        batch, unclipped = self._clip_again(batch, base, round_no)
        mean = noised_mean(batch, base, self.std(len(batch)), rng)
        if self.adaptive:  # after the noise on the updates: that draw stays as without it
            fraction = (unclipped + rng.normal(0.0, self.count_noise)) / len(batch)
            self.clip_norm *= math.exp(-self.rate * (fraction - self.quantile))
        return [mean] * len(batch)

    def _clip_again(
        self, batch: Sequence[Tensors], base: Tensors, round_no: int
    ) -> tuple[list[dict[str, np.ndarray]], int]:
        """The updates clipped to this round's norm, and how many were within it."""
        out, within = [], 0
        for i, tensors in enumerate(batch):
            clipped, before = clipped_weights(tensors, base, self.clip_norm)
            within += before <= self.clip_norm
            if self.at == "worker" and before > self.clip_norm * (1 + SLACK):
                self.over_norm += 1
                log.warning(
                    "round %d: update %d of %d has norm %.4g > DP_CLIP=%g although "
                    "DP_CLIP_AT=worker (its worker did not clip): clipped here",
                    round_no,
                    i + 1,
                    len(batch),
                    before,
                    self.clip_norm,
                )
            out.append(clipped)
        return out, within

    # --- the DP settings in force and adaptive clipping's norm, saved with the checkpoint

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"params": dict(self.params)} if self.params else {}
        return {**state, "clip_norm": self.clip_norm} if self.adaptive else state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Adaptive clipping's saved norm. The saved `params` are checked against the settings
        before (aggregator/restore.py: a run resumes only with the same)."""
        unknown = sorted(set(state) - {"params", "clip_norm"})
        if unknown:
            raise ValueError(f"unknown dp stage state: {', '.join(unknown)}")
        if "clip_norm" not in state:
            return
        norm = state["clip_norm"]
        if not self.adaptive:
            raise ValueError(
                "the checkpoint holds adaptive clipping's norm: resume with DP_CLIP_QUANTILE "
                "set as it was, or reset"
            )
        if isinstance(norm, bool) or not isinstance(norm, int | float) or not norm > 0:
            raise ValueError(f"adaptive clipping's saved norm must be > 0, got {norm!r}")
        self.clip_norm = float(norm)


def check_settings(s: Any) -> None:
    """Refuse DP settings that cannot run or cannot be accounted for, in one line each."""
    if s.dp == "off":
        if s.dp_epsilon_budget:
            raise ConfigError(
                "DP_EPSILON_BUDGET",
                f"{s.dp_epsilon_budget:g}",
                "a budget needs DP=central or local",
            )
        return
    from fedsim import rules

    rule = s.aggregation
    if rules.chosen(s).mode != "rounds":
        raise ConfigError(
            "DP",
            s.dp,
            f"{rule} is asynchronous: DP needs a round rule (fedavg, fedprox, fedavgm, fedadam, "
            "fedyogi, fedadagrad); fedsim cannot account for updates mixed in one by one",
        )
    if rule in ROBUST:
        raise ConfigError(
            "DP",
            s.dp,
            f"{rule} is not an average: DP's noise is calibrated to the mean of clipped updates "
            "and does not bound it; use fedavg or a server optimizer (fedavgm, fedadam, ...)",
        )
    if s.attack != "none":
        raise ConfigError(
            "DP",
            s.dp,
            f"ATTACK={s.attack}: fedsim does not account for attackers under DP; set ATTACK=none "
            "and ATTACKERS=0",
        )
    if s.dp_clip_quantile and (s.dp != "central" or s.dp_clip_at != "aggregator"):
        raise ConfigError(
            "DP_CLIP_QUANTILE",
            f"{s.dp_clip_quantile:g}",
            "adaptive clipping needs DP=central and DP_CLIP_AT=aggregator: the clip norm "
            "changes every round, and only the aggregator knows it",
        )
    if s.dp_clip_quantile and s.dp_noise and not 2 * s.count_noise > s.dp_noise:
        raise ConfigError(
            "DP_CLIP_COUNT_NOISE",
            f"{s.dp_clip_count_noise:g}",
            f"the count's noise ({s.count_noise:g}; 0 means m / 20) must exceed DP_NOISE / 2 "
            f"= {s.dp_noise / 2:g}: raise it, or sample more clients per round",
        )
    if s.dp == "local" and s.dp_clip_at == "aggregator":
        raise ConfigError(
            "DP_CLIP_AT",
            s.dp_clip_at,
            "DP=local clips and noises on the worker: DP_CLIP_AT=aggregator is for DP=central",
        )
