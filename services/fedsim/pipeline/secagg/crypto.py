"""The primitives of secure aggregation, all from `cryptography` (OpenSSL):

- a client's secrets for one round attempt: HKDF-SHA256 (RFC 5869) of the run's
  worker secret, salted with the attempt's nonce, with the client and the round as
  context, gives its two X25519 private keys c_sk (to encrypt shares) and s_sk (to
  agree on masks), its self-mask seed b_u and the seed of its Shamir coefficients.
  Any worker holding the secret re-derives them, so any worker can act for any
  logical client in any phase; the aggregator, without the secret, cannot. A new
  nonce per attempt gives new keys and masks: a client's masks are never reused.
- key agreement: X25519 (RFC 7748), its output through HKDF with a label, so the
  encryption key and the mask seed of a pair are independent;
- the pseudo-random generator: the ChaCha20 keystream (RFC 8439) of a 32-byte seed,
  read as little-endian uint64 words, as many as the vector has weights;
- share encryption: AES-256-GCM under the pair's key, with sender, receiver and
  attempt as associated data, so a ciphertext moved to another pair or attempt fails.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SECRET_BYTES = 32  # the worker secret, keys and seeds
NONCE_BYTES = 16  # the aggregator's per-attempt nonce
_GCM_NONCE = 12


def hkdf(key: bytes, info: str, *, salt: bytes | None = None, length: int = 32) -> bytes:
    return HKDF(hashes.SHA256(), length, salt, info.encode()).derive(key)


def context(round_no: int, nonce: bytes) -> str:
    """What names one attempt of one round in every derivation and associated data."""
    return f"fedsim secagg v1, round {round_no}, attempt {nonce.hex()}"


@dataclass(frozen=True)
class ClientSecrets:
    """One logical client's secrets for one round attempt (never leave a worker)."""

    c_sk: bytes  # X25519 private key: share encryption
    s_sk: bytes  # X25519 private key: pairwise masks
    b: bytes  # the self-mask seed b_u
    coeffs: bytes  # the key of the stream its Shamir coefficients are drawn from

    @property
    def c_pk(self) -> bytes:
        return public_key(self.c_sk)

    @property
    def s_pk(self) -> bytes:
        return public_key(self.s_sk)


def client_secrets(secret: bytes, client: int, round_no: int, nonce: bytes) -> ClientSecrets:
    """HKDF(secret; salt nonce; client, round): the same on every worker with the secret."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"the worker secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"an attempt's nonce must be {NONCE_BYTES} bytes, got {len(nonce)}")
    raw = hkdf(secret, f"{context(round_no, nonce)}, client {client}", salt=nonce, length=128)
    return ClientSecrets(raw[:32], raw[32:64], raw[64:96], raw[96:])


def public_key(private: bytes) -> bytes:
    key = X25519PrivateKey.from_private_bytes(private).public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def agree(private: bytes, public: bytes, label: str) -> bytes:
    """HKDF(X25519(private, public), label): both ends of a pair get the same 32 bytes.
    Raises ValueError for a public key that is not 32 bytes or a low-order point."""
    if len(public) != 32:
        raise ValueError(f"a public key has 32 bytes, got {len(public)}")
    peer = X25519PublicKey.from_public_bytes(public)
    shared = X25519PrivateKey.from_private_bytes(private).exchange(peer)  # ValueError if all 0
    return hkdf(shared, label)


def pair_label(kind: str, ctx: str, u: int, v: int) -> str:
    """The same for (u, v) and (v, u): both ends derive the same key."""
    lo, hi = sorted((u, v))
    return f"{ctx}, {kind}, pair {lo}-{hi}"


def prg(seed: bytes, size: int) -> np.ndarray:
    """`size` uint64 words of ChaCha20's keystream under `seed` (nonce 0, counter 0)."""
    if len(seed) != 32:
        raise ValueError("a PRG seed has 32 bytes")
    cipher = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    stream = cipher.update(bytes(8 * size))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: a random 12-byte nonce, then ciphertext and tag."""
    nonce = os.urandom(_GCM_NONCE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """The plaintext of `encrypt`; ValueError when the key, the data or the AAD do not match."""
    if len(blob) < _GCM_NONCE + 16:
        raise ValueError("a ciphertext is too short")
    try:
        return AESGCM(key).decrypt(blob[:_GCM_NONCE], blob[_GCM_NONCE:], aad)
    except InvalidTag:
        raise ValueError("a ciphertext does not decrypt under its pair's key") from None


class Stream:
    """A deterministic byte stream (ChaCha20 under a key): Shamir's coefficients."""

    def __init__(self, key: bytes) -> None:
        self._enc = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    def __call__(self, n: int) -> bytes:
        return self._enc.update(bytes(n))
