"""A client's side: what it refuses, and that its messages hide its update."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.pipeline.secagg import party, server

SECRET, NONCE = bytes(range(32)), bytes(16)
CLIENTS = (0, 1, 2, 3)


def keys_of(clients=CLIENTS):
    return {u: party.advertise(SECRET, u, 1, NONCE) for u in clients}


def shared():
    """An attempt through phase 3 with every client in."""
    a = server.Attempt(1, NONCE, CLIENTS, {u: 10 for u in CLIENTS}, 3, 50)
    for u in CLIENTS:
        a.add_keys(u, *party.advertise(SECRET, u, 1, NONCE))
    u1 = a.close_keys()
    for u in u1:
        a.add_shares(u, party.share_keys(SECRET, u, 1, NONCE, a.public_keys(u1), 3))
    a.close_shares()
    return a


def test_a_worker_asked_for_both_shares_of_one_client_refuses() -> None:
    a = shared()
    with pytest.raises(party.Refusal, match="both shares of client 2"):
        party.unmask(SECRET, 0, 1, NONCE, a.public_keys(a.u1), a.shares_for(0), [0, 1, 2], [2, 3])


def test_a_client_not_among_the_survivors_does_not_unmask() -> None:
    a = shared()
    with pytest.raises(party.Refusal, match="not among the survivors"):
        party.unmask(SECRET, 3, 1, NONCE, a.public_keys(a.u1), a.shares_for(3), [0, 1, 2], [3])


def test_shares_moved_to_another_receiver_do_not_decrypt() -> None:
    a = shared()
    moved = a.shares_for(0)
    moved[1] = a.shares[1][2]  # client 1's ciphertext for client 2, handed to client 0
    with pytest.raises(party.Refusal, match=r"from client 1: .*does not decrypt"):
        party.unmask(SECRET, 0, 1, NONCE, a.public_keys(a.u1), moved, [0, 1, 2, 3], [])


def test_missing_shares_are_named() -> None:
    a = shared()
    got = a.shares_for(0)
    del got[2]
    with pytest.raises(party.Refusal, match="no shares of client 2"):
        party.unmask(SECRET, 0, 1, NONCE, a.public_keys(a.u1), got, [0, 1, 2, 3], [])


def test_a_set_without_my_advertised_keys_is_refused() -> None:
    keys = keys_of()
    with pytest.raises(party.Refusal, match="U1 does not list client 9"):
        party.share_keys(SECRET, 9, 1, NONCE, keys, 3)
    keys[0] = keys[1]
    with pytest.raises(party.Refusal, match="U2 does not list client 0"):
        party.masked_input(SECRET, 0, 1, NONCE, np.zeros(5, np.float32), 1, keys)


def test_a_threshold_outside_the_set_is_refused() -> None:
    with pytest.raises(party.Refusal, match="threshold 5"):
        party.share_keys(SECRET, 0, 1, NONCE, keys_of(), 5)


def test_ciphertexts_hold_no_share_in_the_clear() -> None:
    from fedsim.pipeline.secagg import crypto, shamir

    cts = party.share_keys(SECRET, 0, 1, NONCE, keys_of(), 3)
    me = crypto.client_secrets(SECRET, 0, 1, NONCE)
    stream = crypto.Stream(crypto.hkdf(me.coeffs, "s"))
    s_shares = shamir.split(me.s_sk, 3, [party.x_of(v) for v in CLIENTS], stream)
    for v, blob in cts.items():
        assert s_shares[party.x_of(v)] not in blob and me.s_sk not in blob
