"""The primitives: derived keys, agreement, the PRG, share encryption."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.pipeline.secagg import crypto

SECRET, NONCE = bytes(range(32)), bytes(16)


def test_client_secrets_are_a_function_of_secret_client_round_and_nonce() -> None:
    base = crypto.client_secrets(SECRET, 1, 1, NONCE)
    assert crypto.client_secrets(SECRET, 1, 1, NONCE) == base  # any worker gets the same
    others = [
        crypto.client_secrets(SECRET, 2, 1, NONCE),
        crypto.client_secrets(SECRET, 1, 2, NONCE),
        crypto.client_secrets(SECRET, 1, 1, b"\x01" + bytes(15)),  # a new attempt
        crypto.client_secrets(bytes(32), 1, 1, NONCE),
    ]
    for other in others:
        assert other.b != base.b and other.s_sk != base.s_sk and other.c_sk != base.c_sk
    assert len({base.c_sk, base.s_sk, base.b, base.coeffs}) == 4


def test_bad_secret_or_nonce_lengths() -> None:
    with pytest.raises(ValueError, match="worker secret"):
        crypto.client_secrets(b"short", 1, 1, NONCE)
    with pytest.raises(ValueError, match="nonce"):
        crypto.client_secrets(SECRET, 1, 1, b"x")


def test_agreement_is_symmetric_and_labelled() -> None:
    u = crypto.client_secrets(SECRET, 1, 1, NONCE)
    v = crypto.client_secrets(SECRET, 2, 1, NONCE)
    label = crypto.pair_label("mask", "ctx", 1, 2)
    assert label == crypto.pair_label("mask", "ctx", 2, 1)
    assert crypto.agree(u.s_sk, v.s_pk, label) == crypto.agree(v.s_sk, u.s_pk, label)
    assert crypto.agree(u.s_sk, v.s_pk, label) != crypto.agree(u.s_sk, v.s_pk, label + "x")
    with pytest.raises(ValueError):
        crypto.agree(u.s_sk, bytes(32), label)  # a low-order point
    with pytest.raises(ValueError, match="32 bytes"):
        crypto.agree(u.s_sk, b"abc", label)


def test_prg_is_deterministic_and_its_prefix_stable() -> None:
    a = crypto.prg(bytes(32), 1000)
    assert a.dtype == np.uint64 and a.shape == (1000,)
    assert np.array_equal(crypto.prg(bytes(32), 10), a[:10])
    assert not np.array_equal(crypto.prg(b"\x01" * 32, 10), a[:10])


def test_encryption_binds_key_and_associated_data() -> None:
    key = bytes(32)
    blob = crypto.encrypt(key, b"share", b"from 1 to 2")
    assert crypto.decrypt(key, blob, b"from 1 to 2") == b"share"
    assert b"share" not in blob
    with pytest.raises(ValueError, match="does not decrypt"):
        crypto.decrypt(key, blob, b"from 1 to 3")
    with pytest.raises(ValueError, match="does not decrypt"):
        crypto.decrypt(b"\x01" * 32, blob, b"from 1 to 2")
    with pytest.raises(ValueError, match="too short"):
        crypto.decrypt(key, b"abc", b"")
