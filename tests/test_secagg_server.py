"""One round attempt end to end (no training): the unmasked mean is the plain weighted mean,
dropouts are recovered, below the threshold the attempt is abandoned."""

from __future__ import annotations

import secrets

import numpy as np
import pytest

from fedsim.pipeline.secagg import fixedpoint, party, server
from helpers.secagg import run_attempt, weighted_mean

SECRET = bytes(range(32))


def inputs_for(n: int, size: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    clients = [int(c) for c in rng.choice(1000, n, replace=False)]
    xs = {u: rng.normal(0, 0.1, size).astype(np.float32) for u in clients}
    ns = {u: int(rng.integers(1, 60_000 // n)) for u in clients}
    return xs, ns


@pytest.mark.parametrize("n", [3, 10, 50])
def test_unmasked_mean_is_the_plain_weighted_mean(n: int) -> None:
    xs, ns = inputs_for(n, seed=n)
    t = server.minimum_threshold(n)
    a, mean, weight = run_attempt(SECRET, secrets.token_bytes(16), xs, ns, t)
    assert a.u3 == tuple(sorted(xs)) and weight == sum(ns.values())
    plain = weighted_mean(xs, ns, xs)
    assert np.abs(mean - plain).max() <= fixedpoint.step(n, weight) + 1e-12
    # the masks did something: no masked input is its encoded update
    u = a.u3[0]
    assert not np.array_equal(a.masked[u], fixedpoint.encode(xs[u], ns[u]))


@pytest.mark.parametrize("where", ["drop_after_shares", "drop_before_unmask"])
def test_one_dropout_is_recovered(where: str) -> None:
    xs, ns = inputs_for(10, seed=1)
    gone = sorted(xs)[4]
    _, mean, weight = run_attempt(SECRET, secrets.token_bytes(16), xs, ns, 7, **{where: [gone]})
    among = [u for u in xs if u != gone] if where == "drop_after_shares" else list(xs)
    assert np.abs(mean - weighted_mean(xs, ns, among)).max() <= 1e-9
    assert weight == sum(ns[u] for u in among)


def test_threshold_minus_one_dropouts_are_recovered() -> None:
    """n = 10, t = 6: 4 drop after sharing (their pairwise masks rebuilt from s_sk shares),
    then the 6 survivors all answer."""
    xs, ns = inputs_for(10, seed=2)
    gone = sorted(xs)[::3][:4]
    a, mean, _ = run_attempt(SECRET, secrets.token_bytes(16), xs, ns, 6, drop_after_shares=gone)
    assert a.dropped == tuple(gone)
    survivors = [u for u in xs if u not in gone]
    assert np.abs(mean - weighted_mean(xs, ns, survivors)).max() <= 1e-9


def test_dropped_after_keys_is_left_out_of_every_later_set() -> None:
    xs, ns = inputs_for(5, seed=3)
    gone = sorted(xs)[0]
    a, mean, _ = run_attempt(SECRET, secrets.token_bytes(16), xs, ns, 3, drop_after_keys=[gone])
    assert gone in a.u1 and gone not in a.u2 and gone not in a.u3
    rest = [u for u in xs if u != gone]
    assert np.abs(mean - weighted_mean(xs, ns, rest)).max() <= 1e-9


@pytest.mark.parametrize("where", ["drop_after_keys", "drop_after_shares", "drop_before_unmask"])
def test_below_the_threshold_the_attempt_is_abandoned(where: str) -> None:
    xs, ns = inputs_for(6, seed=4)
    gone = sorted(xs)[:3]  # 3 of 6 left, t = 4
    with pytest.raises(server.Abandoned, match="below SECAGG_THRESHOLD=4"):
        run_attempt(SECRET, secrets.token_bytes(16), xs, ns, 4, **{where: gone})


def test_a_masked_upload_looks_uniform() -> None:
    """Chi-square over the 256 byte values of one masked input (a constant update)."""
    xs = {u: np.full(20_000, 0.01, np.float32) for u in range(3)}
    ns = {u: 100 for u in xs}
    a, _, _ = run_attempt(SECRET, secrets.token_bytes(16), xs, ns, 2)
    counts = np.bincount(np.frombuffer(a.masked[0].tobytes(), np.uint8), minlength=256)
    expected = counts.sum() / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 340  # 255 degrees of freedom: P(chi2 > 340) < 0.0004
    plain = np.frombuffer(fixedpoint.encode(xs[0], 100).tobytes(), np.uint8)
    plain_counts = np.bincount(plain, minlength=256)
    assert float(((plain_counts - expected) ** 2 / expected).sum()) > 340  # the test can fail


def test_a_new_nonce_gives_new_masks() -> None:
    xs, ns = inputs_for(3, seed=5)
    a, m1, _ = run_attempt(SECRET, bytes(16), xs, ns, 2)
    b, m2, _ = run_attempt(SECRET, b"\x01" * 16, xs, ns, 2)
    u = a.u3[0]
    assert not np.array_equal(a.masked[u], b.masked[u])
    assert np.allclose(m1, m2)


def test_phase_messages_are_checked() -> None:
    xs, ns = inputs_for(3, seed=6)
    clients = sorted(xs)
    nonce = bytes(16)
    a = server.Attempt(1, nonce, clients, ns, 2, 300)
    with pytest.raises(server.Malformed, match="not expected"):
        a.add_keys(9999, bytes(32), bytes(32))
    with pytest.raises(server.Malformed, match="32 bytes"):
        a.add_keys(clients[0], b"x", bytes(32))
    keys = party.advertise(SECRET, clients[0], 1, nonce)
    assert a.add_keys(clients[0], *keys) is True
    assert a.add_keys(clients[0], *keys) is False  # a retry
    with pytest.raises(server.Malformed, match="different message"):
        a.add_keys(clients[0], bytes(32), bytes(32))
    with pytest.raises(server.Malformed, match="phase keys, not masked"):
        a.add_masked(clients[0], np.zeros(300, np.uint64))
    for u in clients[1:]:
        a.add_keys(u, *party.advertise(SECRET, u, 1, nonce))
    u1 = a.close_keys()
    with pytest.raises(server.Malformed, match="exactly"):
        a.add_shares(u1[0], {u1[0]: b"x"})
    for u in u1:
        a.add_shares(u, party.share_keys(SECRET, u, 1, nonce, a.public_keys(u1), 2))
    a.close_shares()
    for bad in (np.zeros(300, np.float32), np.zeros(299, np.uint64), [0] * 300):
        with pytest.raises(server.Malformed, match="300 uint64"):
            a.add_masked(u1[0], bad)  # type: ignore[arg-type]


def test_threshold_must_be_more_than_half() -> None:
    with pytest.raises(ValueError, match="> half"):
        server.Attempt(1, bytes(16), [1, 2, 3, 4], {}, 2, 10)
    with pytest.raises(ValueError, match="> half"):
        server.Attempt(1, bytes(16), [1, 2, 3, 4], {}, 5, 10)
    assert server.minimum_threshold(4) == 3 and server.minimum_threshold(5) == 3
