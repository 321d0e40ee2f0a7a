"""Shamir's t-of-n secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

Shamir, "How to Share a Secret", Communications of the ACM 22(11), 1979. A secret
s < p is the constant term of a random polynomial f of degree t - 1 over GF(p); the
share of party x (x = 1, 2, ...; never 0) is (x, f(x)). Any t shares give f(0) = s
by Lagrange interpolation at 0:

    s = sum_j y_j prod_{m != j} x_m / (x_m - x_j)   (mod p)

and any t - 1 shares are consistent with every s (for each candidate s there is
exactly one polynomial of degree t - 1 through them and (0, s)), so they say
nothing about it. p = 2^521 - 1 is a Mersenne prime larger than every 32-byte
secret (2^256), so a secret is one field element; a share's y is written in 66
bytes. The coefficients come from a caller's byte stream (secure aggregation derives
it from a key, so a client's shares can be re-made by any worker acting for it); each
coefficient is 80 bytes reduced mod p, whose bias is below 2^-118.

There is no well-kept PyPI package for this; the code is small and tested on its
edge cases (tests/test_secagg_shamir.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

PRIME = 2**521 - 1
SECRET_BYTES = 32  # X25519 private keys and mask seeds
SHARE_BYTES = 66  # ceil(521 / 8): a share's y in big-endian bytes
_COEFF_BYTES = 80  # 640 random bits per coefficient, reduced mod p


def split(
    secret: bytes, threshold: int, xs: Sequence[int], randbytes: Callable[[int], bytes]
) -> dict[int, bytes]:
    """Shares of `secret` (at most 32 bytes) for each x in `xs`, any `threshold` of which
    rebuild it: {x: f(x) in 66 bytes}. Raises ValueError on a bad threshold or x."""
    if len(secret) > SECRET_BYTES:
        raise ValueError(f"a secret is at most {SECRET_BYTES} bytes, got {len(secret)}")
    _check_xs(xs)
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be between 1 and the {len(xs)} parties")
    coeffs = [int.from_bytes(secret, "big")]
    for _ in range(threshold - 1):
        coeffs.append(int.from_bytes(randbytes(_COEFF_BYTES), "big") % PRIME)
    return {x: _evaluate(coeffs, x).to_bytes(SHARE_BYTES, "big") for x in xs}


def combine(shares: Mapping[int, bytes], size: int = SECRET_BYTES) -> bytes:
    """The secret of `size` bytes whose polynomial passes through `shares` ({x: y}).

    With fewer shares than the threshold the result is some other value (nothing tells
    it from the secret); the caller counts shares. Raises ValueError for a malformed
    share or a result that does not fit in `size` bytes (a wrong or too-short set).
    """
    _check_xs(list(shares))
    points = []
    for x, raw in shares.items():
        if len(raw) != SHARE_BYTES:
            raise ValueError(f"share {x} has {len(raw)} bytes, not {SHARE_BYTES}")
        y = int.from_bytes(raw, "big")
        if y >= PRIME:
            raise ValueError(f"share {x} is not a field element")
        points.append((x, y))
    secret = 0
    for j, (xj, yj) in enumerate(points):
        num, den = 1, 1
        for m, (xm, _) in enumerate(points):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        secret = (secret + yj * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * size):
        raise ValueError("the shares do not rebuild a secret of this size (too few or wrong)")
    return secret.to_bytes(size, "big")


def _evaluate(coeffs: Sequence[int], x: int) -> int:
    """f(x) mod p by Horner's rule; coeffs[0] is the constant term."""
    y = 0
    for c in reversed(coeffs):
        y = (y * x + c) % PRIME
    return y


def _check_xs(xs: Sequence[int]) -> None:
    if not xs:
        raise ValueError("no parties")
    for x in xs:
        if isinstance(x, bool) or not isinstance(x, int) or not 0 < x < PRIME:
            raise ValueError(f"a party's x must be an integer in 1..p-1, got {x!r}")
    if len(set(xs)) != len(xs):
        raise ValueError("two parties share an x")
