"""A logical client's side of secure aggregation (Bonawitz et al. 2017, Figure 4), one
function per phase, each computed from the worker secret and what the phase's task
carries: a worker keeps nothing between phases, so any worker can do any phase.

1. `advertise`: the client's public keys (c_pk, s_pk).
2. `share_keys`: t-of-|U1| Shamir shares of s_sk_u and of b_u, one pair of shares for
   every v in U1 (u itself included), each encrypted with AES-GCM under
   KA(c_sk_u, c_pk_v): the aggregator routes them and cannot read them.
3. `masked_input`: y_u = encode(n_u x_u) + PRG(b_u) + sum_{v in U2, v > u} PRG(s_uv)
   - sum_{v in U2, v < u} PRG(s_uv) mod 2^64, with s_uv = KA(s_sk_u, s_pk_v).
4. `unmask`: the share of b_v for each survivor v in U3 and of s_sk_v for each v that
   dropped after sharing (U2 \\ U3), never both for one v: with both, the aggregator
   could strip v's masks from y_v and read v's update.

Raises `Refusal` (a ValueError) for what a client must not do.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from fedsim.pipeline.secagg import crypto, fixedpoint, shamir

Keys = Mapping[int, tuple[bytes, bytes]]  # client -> (c_pk, s_pk)


class Refusal(ValueError):
    """What a client refuses to do in a phase, in one line."""


def x_of(client: int) -> int:
    """A client's Shamir x: its number + 1 (x = 0 would be the secret itself)."""
    return client + 1


def share_aad(ctx: str, sender: int, receiver: int) -> bytes:
    return f"{ctx}, shares from {sender} to {receiver}".encode()


def advertise(secret: bytes, client: int, round_no: int, nonce: bytes) -> tuple[bytes, bytes]:
    """Phase 1: (c_pk, s_pk) of `client` for this attempt."""
    me = crypto.client_secrets(secret, client, round_no, nonce)
    return me.c_pk, me.s_pk


def share_keys(
    secret: bytes, client: int, round_no: int, nonce: bytes, u1: Keys, threshold: int
) -> dict[int, bytes]:
    """Phase 2: {v: AES-GCM(s_sk share || b share)} for every v in U1."""
    me = _me(secret, client, round_no, nonce, u1, "U1")
    if not 1 < threshold <= len(u1):
        raise Refusal(f"threshold {threshold} needs 2 <= t <= |U1| = {len(u1)}")
    xs = [x_of(v) for v in sorted(u1)]
    s_shares = shamir.split(me.s_sk, threshold, xs, crypto.Stream(crypto.hkdf(me.coeffs, "s")))
    b_shares = shamir.split(me.b, threshold, xs, crypto.Stream(crypto.hkdf(me.coeffs, "b")))
    ctx = crypto.context(round_no, nonce)
    out = {}
    for v in sorted(u1):
        key = crypto.agree(me.c_sk, u1[v][0], crypto.pair_label("encrypt", ctx, client, v))
        plain = s_shares[x_of(v)] + b_shares[x_of(v)]
        out[v] = crypto.encrypt(key, plain, share_aad(ctx, client, v))
    return out


def masks(me: crypto.ClientSecrets, client: int, ctx: str, u2: Keys, size: int) -> np.ndarray:
    """PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv) mod 2^64 over v in U2."""
    total = crypto.prg(me.b, size)
    for v in sorted(u2):
        if v == client:
            continue
        seed = crypto.agree(me.s_sk, u2[v][1], crypto.pair_label("mask", ctx, client, v))
        if v > client:
            total += crypto.prg(seed, size)
        else:
            total -= crypto.prg(seed, size)
    return total


def masked_input(
    secret: bytes,
    client: int,
    round_no: int,
    nonce: bytes,
    x: np.ndarray,
    weight: int,
    u2: Keys,
) -> np.ndarray:
    """Phase 3: y_u, uint64, one word per entry of the flat float vector `x` (the delta)."""
    me = _me(secret, client, round_no, nonce, u2, "U2")
    flat = np.asarray(x, np.float32).ravel()
    ctx = crypto.context(round_no, nonce)
    return fixedpoint.encode(flat, weight) + masks(me, client, ctx, u2, flat.size)


def unmask(
    secret: bytes,
    client: int,
    round_no: int,
    nonce: bytes,
    u1: Keys,
    received: Mapping[int, bytes],
    survivors: Collection[int],
    dropped: Collection[int],
) -> dict[int, bytes]:
    """Phase 4: {v: b_v's share} for v in `survivors` (U3) and {v: s_sk_v's share} for v in
    `dropped` (U2 \\ U3), decrypted from `received` ({sender v: the ciphertext v sent me})."""
    both = sorted(set(survivors) & set(dropped))
    if both:
        raise Refusal(
            f"asked for both shares of client {both[0]} (its mask seed and its key): that "
            "would unmask its single update"
        )
    if client not in survivors:
        raise Refusal(f"client {client} is not among the survivors U3: it does not unmask")
    me = crypto.client_secrets(secret, client, round_no, nonce)
    ctx = crypto.context(round_no, nonce)
    out = {}
    for v in sorted({*survivors, *dropped}):
        if v not in u1 or v not in received:
            raise Refusal(f"no shares of client {v} were routed to client {client}")
        key = crypto.agree(me.c_sk, u1[v][0], crypto.pair_label("encrypt", ctx, client, v))
        try:
            plain = crypto.decrypt(key, received[v], share_aad(ctx, v, client))
        except ValueError as exc:
            raise Refusal(f"the shares from client {v}: {exc}") from None
        if len(plain) != 2 * shamir.SHARE_BYTES:
            raise Refusal(f"the shares from client {v} have {len(plain)} bytes")
        s_share, b_share = plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :]
        out[v] = b_share if v in survivors else s_share
    return out


def _me(
    secret: bytes, client: int, round_no: int, nonce: bytes, keys: Keys, name: str
) -> crypto.ClientSecrets:
    """My secrets, after checking the set lists me with the keys I advertised."""
    me = crypto.client_secrets(secret, client, round_no, nonce)
    if keys.get(client) != (me.c_pk, me.s_pk):
        raise Refusal(f"{name} does not list client {client} with the keys it advertised")
    return me
