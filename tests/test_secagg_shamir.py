"""Shamir's secret sharing over GF(2^521 - 1): any t shares rebuild, t - 1 do not."""

from __future__ import annotations

import itertools
import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.pipeline.secagg import shamir


def stream(seed: int = 0):
    import random

    rng = random.Random(seed)
    return lambda n: rng.randbytes(n)


SECRET = bytes(range(1, 33))


def test_every_t_subset_rebuilds_the_secret() -> None:
    shares = shamir.split(SECRET, 3, [1, 2, 3, 4, 5], stream())
    for subset in itertools.combinations(shares, 3):
        assert shamir.combine({x: shares[x] for x in subset}) == SECRET
    assert shamir.combine(shares) == SECRET  # more than t is fine


def test_t_minus_one_shares_give_a_wrong_secret() -> None:
    shares = shamir.split(SECRET, 4, [1, 2, 3, 4, 5, 6], stream(1))
    for subset in itertools.combinations(shares, 3):
        try:
            rebuilt = shamir.combine({x: shares[x] for x in subset})
        except ValueError:
            continue  # the interpolated value does not even fit in 32 bytes
        assert rebuilt != SECRET


def test_a_threshold_of_one_is_the_secret_itself_and_all_are_needed_at_n() -> None:
    one = shamir.split(SECRET, 1, [7, 9], stream())
    assert all(int.from_bytes(y, "big") == int.from_bytes(SECRET, "big") for y in one.values())
    full = shamir.split(SECRET, 4, [1, 2, 3, 4], stream())
    assert shamir.combine(full) == SECRET


def test_the_zero_secret_and_the_largest() -> None:
    for secret in (bytes(32), b"\xff" * 32):
        shares = shamir.split(secret, 2, [1, 2], stream())
        assert shamir.combine(shares) == secret


def test_shares_depend_on_the_random_stream_only_through_the_coefficients() -> None:
    a = shamir.split(SECRET, 3, [1, 2, 3], stream(5))
    b = shamir.split(SECRET, 3, [1, 2, 3], stream(6))
    assert a != b
    assert shamir.combine(a) == shamir.combine(b) == SECRET
    assert shamir.split(SECRET, 3, [1, 2, 3], stream(5)) == a  # deterministic in the stream


@pytest.mark.parametrize(
    ("secret", "t", "xs", "message"),
    [
        (b"x" * 33, 2, [1, 2], "at most 32 bytes"),
        (SECRET, 0, [1, 2], "threshold 0"),
        (SECRET, 3, [1, 2], "threshold 3"),
        (SECRET, 2, [0, 1], "1..p-1"),
        (SECRET, 2, [1, 1], "share an x"),
        (SECRET, 1, [], "no parties"),
        (SECRET, 1, [True], "1..p-1"),
    ],
)
def test_bad_splits_are_refused(secret: bytes, t: int, xs: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        shamir.split(secret, t, xs, stream())


def test_malformed_shares_are_refused() -> None:
    shares = shamir.split(SECRET, 2, [1, 2], stream())
    with pytest.raises(ValueError, match="66"):
        shamir.combine({1: shares[1], 2: shares[2][:-1]})
    with pytest.raises(ValueError, match="field element"):
        shamir.combine({1: shares[1], 2: b"\xff" * 66})
    with pytest.raises(ValueError, match="no parties"):
        shamir.combine({})


def test_a_tampered_share_rebuilds_something_else() -> None:
    shares = shamir.split(SECRET, 2, [1, 2], stream())
    bad = bytearray(shares[2])
    bad[-1] ^= 1
    try:
        rebuilt = shamir.combine({1: shares[1], 2: bytes(bad)})
    except ValueError:
        return  # it does not even fit in 32 bytes
    assert rebuilt != SECRET


@settings(max_examples=40, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    n=st.integers(2, 12),
    data=st.data(),
)
def test_any_t_of_n_rebuild(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    xs = data.draw(st.lists(st.integers(1, 10_000), min_size=n, max_size=n, unique=True))
    shares = shamir.split(secret, t, xs, secrets.token_bytes)
    chosen = data.draw(st.lists(st.sampled_from(xs), min_size=t, max_size=t, unique=True))
    assert shamir.combine({x: shares[x] for x in chosen}) == secret
