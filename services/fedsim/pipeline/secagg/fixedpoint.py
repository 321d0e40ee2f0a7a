"""Fixed-point encoding of weighted deltas in Z_(2^64), so that masked sums cannot overflow.

A client u masks y_u = encode(n_u x_u) + masks (mod 2^64), with x_u its delta
w - w_t and n_u its task's sample count (the aggregator knows it from the partition
plan, so the mean is count-weighted as in FedAvg). Encoding:

    encode(n, x) = round(n clip(x, -B, B) 2^F)  as a two's complement 64-bit integer

with B = CLIP = 2^12 and F = FRAC_BITS = 32. Decoding the sum of the survivors U:

    mean = int64(sum_u encode(n_u, x_u) mod 2^64) / (2^F sum_u n_u)

Why it cannot overflow: |round(n_u clip(x) 2^F)| <= n_u B 2^F exactly (n_u B 2^F is an
integer), so |sum_u encode| <= B 2^F sum_u n_u <= 2^12 2^32 2^16 = 2^60 < 2^63 as long as
sum_u n_u <= MAX_TOTAL = 2^16 = 65,536 (MNIST has 60,000 training images, each in at most
one client's task of a round). The true sum then lies in [-2^63, 2^63), where reading the
64-bit residue as a signed integer gives it back exactly: the masks cancel mod 2^64 and
the wrap-around of the modular sum loses nothing.

Exactness: x is float32 (24-bit mantissa) and n < 2^16, so n x 2^F is exact in float64
and rounding to an integer costs at most 1/2 per weight and client; the sum of integers
is exact. The mean's error is therefore at most `step(m, W)` = m / (2^(F+1) W) for m
clients of total count W, plus float64's relative 2^-52 in the final division, far
below float32's resolution. B = 4096 per weight clips nothing a trained MNIST model
moves (its deltas are below 10); an update beyond it is garbage either way.
"""

from __future__ import annotations

import numpy as np

BITS = 64  # k: numpy's uint64 wraps modulo 2^64 by itself
FRAC_BITS = 32  # F: the scale 2^F
CLIP = 2.0**12  # B: |x| per weight is clipped to this before encoding
MAX_TOTAL = 2**16  # the largest sum of the counts n_u of one round's survivors
SCALE = 2.0**FRAC_BITS


def encode(x: np.ndarray, weight: int) -> np.ndarray:
    """round(weight clip(x, -B, B) 2^F) mod 2^64 as uint64, for a count 1 <= weight <= 2^16."""
    check_weight(weight, "a client's count")
    scaled = np.clip(np.asarray(x, np.float64), -CLIP, CLIP) * (weight * SCALE)
    return np.rint(scaled).astype(np.int64).view(np.uint64)


def decode(total: np.ndarray, weight: int) -> np.ndarray:
    """The weighted mean sum / (2^F weight) from the modular sum of the survivors' encodings."""
    check_weight(weight, "the survivors' total count")
    signed = np.asarray(total, np.uint64).view(np.int64)
    return signed.astype(np.float64) / (SCALE * weight)


def step(clients: int, weight: int) -> float:
    """The largest error of `decode` over `clients` encodings of total count `weight`."""
    return clients / (2.0 * SCALE * weight)


def check_weight(weight: int, what: str) -> None:
    if isinstance(weight, bool) or not isinstance(weight, int | np.integer):
        raise ValueError(f"{what} must be an integer, got {weight!r}")
    if not 1 <= weight <= MAX_TOTAL:
        raise ValueError(f"{what} must be in 1..{MAX_TOTAL} so that sums cannot overflow")
