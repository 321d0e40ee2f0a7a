"""The aggregator's side of secure aggregation (Bonawitz et al. 2017, Figure 4): one round
attempt's four phases, the sets U1 ⊇ U2 ⊇ U3 ⊇ U4 of clients still in, and the unmasking.

Each phase collects one message per client and is closed by the caller (when all are
in, or on its timeout); a close with fewer than `threshold` clients raises `Abandoned`
and the attempt is dropped whole: nothing of it is published. From what it holds the
aggregator learns the survivors' weighted sum and nothing of a single y_u: every y_u
is uniform in Z_(2^64)^d under its self mask PRG(b_u), and it gets b_v's shares only
for survivors and s_sk_v's only for clients that dropped before their masked input.

Unmasking (survivors U3, dropped D = U2 \\ U3, shares from U4, |U4| >= t):

    sum_{u in U3} y_u - sum_{u in U3} PRG(b_u) - sum_{v in D, u in U3} sign(v, u) PRG(s_vu)
      = sum_{u in U3} encode(n_u x_u)   (mod 2^64)

with sign(v, u) = +1 when v > u (u added +PRG(s_uv) for every v > u), else -1; the
pairwise masks among survivors cancel in pairs. The weighted mean is then
decode(sum, sum_{u in U3} n_u) (`fixedpoint`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedsim.pipeline.secagg import crypto, fixedpoint, shamir
from fedsim.pipeline.secagg.party import Keys, x_of

PHASES = ("keys", "shares", "masked", "unmask", "done")


class Abandoned(RuntimeError):
    """The attempt cannot finish (too few clients left, a share that does not rebuild)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class Malformed(ValueError):
    """A phase message the aggregator refuses (a 4xx), in one line; nothing changes."""


def minimum_threshold(clients: int) -> int:
    """The smallest threshold allowed for `clients`: more than half of them."""
    return clients // 2 + 1


@dataclass
class Attempt:
    """One attempt of round `round_no` with `nonce`, over `sampled` clients of known counts."""

    round_no: int
    nonce: bytes
    sampled: Sequence[int]
    weights: Mapping[int, int]  # n_u per sampled client, from the partition plan
    threshold: int
    size: int  # the flat vector's length
    phase: str = "keys"
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    shares: dict[int, dict[int, bytes]] = field(default_factory=dict)  # sender -> receiver
    masked: dict[int, np.ndarray] = field(default_factory=dict)
    answers: dict[int, dict[int, bytes]] = field(default_factory=dict)  # U4 -> v -> share
    u1: tuple[int, ...] = ()
    u2: tuple[int, ...] = ()
    u3: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not minimum_threshold(len(self.sampled)) <= self.threshold <= len(self.sampled):
            raise ValueError(
                f"threshold {self.threshold} must be > half of and <= the "
                f"{len(self.sampled)} sampled clients"
            )
        if len(self.nonce) != crypto.NONCE_BYTES:
            raise ValueError("bad nonce")

    @property
    def context(self) -> str:
        return crypto.context(self.round_no, self.nonce)

    @property
    def dropped(self) -> tuple[int, ...]:
        """U2 \\ U3: clients that shared their keys but sent no masked input."""
        return tuple(v for v in self.u2 if v not in self.u3)

    def expected(self) -> tuple[int, ...]:
        """Who the open phase waits for."""
        return {
            "keys": tuple(self.sampled),
            "shares": self.u1,
            "masked": self.u2,
            "unmask": self.u3,
        }.get(self.phase, ())

    def received(self) -> tuple[int, ...]:
        got = {"keys": self.keys, "shares": self.shares, "masked": self.masked}
        return tuple(sorted(got.get(self.phase, self.answers)))

    def complete(self) -> bool:
        return set(self.received()) >= set(self.expected())

    # --- phase 1: advertise keys -------------------------------------------------------

    def add_keys(self, u: int, c_pk: bytes, s_pk: bytes) -> bool:
        """Client u's public keys; False when the same were already in (a retry)."""
        self._expect("keys", u)
        if len(c_pk) != 32 or len(s_pk) != 32:
            raise Malformed("public keys are 32 bytes each")
        return self._put(self.keys, u, (c_pk, s_pk))

    def close_keys(self) -> tuple[int, ...]:
        self.u1 = self._close("keys", self.keys)
        return self.u1

    def public_keys(self, among: Sequence[int]) -> Keys:
        return {v: self.keys[v] for v in among}

    # --- phase 2: share keys -----------------------------------------------------------

    def add_shares(self, u: int, ciphertexts: Mapping[int, bytes]) -> bool:
        """Client u's encrypted shares, one for every v in U1 (u too)."""
        self._expect("shares", u)
        if set(ciphertexts) != set(self.u1):
            raise Malformed(f"shares must be addressed to exactly the {len(self.u1)} clients of U1")
        return self._put(self.shares, u, dict(ciphertexts))

    def close_shares(self) -> tuple[int, ...]:
        self.u2 = self._close("shares", self.shares)
        return self.u2

    def shares_for(self, v: int) -> dict[int, bytes]:
        """{sender u in U2: the ciphertext u addressed to v}: routed to v in phase 4."""
        return {u: self.shares[u][v] for u in self.u2}

    # --- phase 3: masked input ---------------------------------------------------------

    def add_masked(self, u: int, y: np.ndarray) -> bool:
        self._expect("masked", u)
        if not isinstance(y, np.ndarray) or y.dtype != np.uint64 or y.shape != (self.size,):
            raise Malformed(f"a masked input is {self.size} uint64 words")
        return self._put(self.masked, u, y)

    def close_masked(self) -> tuple[int, ...]:
        self.u3 = self._close("masked", self.masked)
        return self.u3

    # --- phase 4: unmask ---------------------------------------------------------------

    def add_unmask(self, u: int, shares: Mapping[int, bytes]) -> bool:
        """Survivor u's shares: b_v's for v in U3, s_sk_v's for v in U2 \\ U3."""
        self._expect("unmask", u)
        if set(shares) != set(self.u2):
            raise Malformed("unmask answers hold one share for every client of U2")
        if any(len(s) != shamir.SHARE_BYTES for s in shares.values()):
            raise Malformed(f"a share has {shamir.SHARE_BYTES} bytes")
        return self._put(self.answers, u, dict(shares))

    def close_unmask(self) -> tuple[np.ndarray, int]:
        """(the survivors' weighted mean, flat float64; their total count n). Raises Abandoned."""
        u4 = self._close("unmask", self.answers)
        helpers = u4[: self.threshold]  # any t shares rebuild; more only cost time
        total = np.zeros(self.size, np.uint64)
        for u in self.u3:
            total += self.masked[u]
        for u in self.u3:
            total -= crypto.prg(self._rebuild(u, helpers), self.size)
        for v in self.dropped:
            s_sk = self._rebuild(v, helpers)
            if crypto.public_key(s_sk) != self.keys[v][1]:
                raise Abandoned(f"the shares of client {v}'s key do not rebuild it")
            for u in self.u3:
                label = crypto.pair_label("mask", self.context, v, u)
                mask = crypto.prg(crypto.agree(s_sk, self.keys[u][1], label), self.size)
                if v > u:  # u added +PRG(s_uv) for v > u
                    total -= mask
                else:
                    total += mask
        weight = sum(int(self.weights[u]) for u in self.u3)
        return fixedpoint.decode(total, weight), weight

    def _rebuild(self, v: int, helpers: Sequence[int]) -> bytes:
        try:
            return shamir.combine({x_of(u): self.answers[u][v] for u in helpers})
        except ValueError as exc:
            raise Abandoned(f"client {v}'s shares do not rebuild its secret ({exc})") from None

    # --- bookkeeping -------------------------------------------------------------------

    def _expect(self, phase: str, u: int) -> None:
        if self.phase != phase:
            raise Malformed(f"the attempt is in phase {self.phase}, not {phase}")
        if u not in self.expected():
            raise Malformed(f"client {u} is not expected in phase {phase}")

    def _put(self, into: dict, u: int, value: object) -> bool:
        """Store u's message; False for a repeat of the same, Malformed for a different one."""
        if u in into:
            same = (
                np.array_equal(into[u], value)
                if isinstance(value, np.ndarray)
                else into[u] == value
            )
            if not same:
                raise Malformed(f"client {u} already sent a different message in this phase")
            return False
        into[u] = value
        return True

    def _close(self, phase: str, got: Mapping[int, object]) -> tuple[int, ...]:
        if self.phase != phase:
            raise RuntimeError(f"closing phase {phase} while in {self.phase}")
        members, wanted = tuple(sorted(got)), len(self.expected())
        if len(members) < self.threshold:
            self.phase = "done"
            raise Abandoned(
                f"round {self.round_no}: {len(members)} of {wanted} clients "
                f"in at the end of phase {phase}, below SECAGG_THRESHOLD={self.threshold}"
            )
        self.phase = PHASES[PHASES.index(phase) + 1]
        return members
