"""The secagg stage: on the worker, the trained delta becomes the masked input y_u.

    y_u = encode(n_u (w - w_t)) + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)

(party.masked_input), with n_u the task's sample count and U2's public keys from the
task's `secagg` field, laid out as uint64 tensors of the model's names and shapes
(`vectors`, sorted name order). The worker pushes it to /v1/secagg/masked instead of
the plain update. The aggregator side does nothing here: the masks come off only with
the whole round (aggregator/secure.py). The worker secret, from which every client's
keys and masks derive, is read from SECAGG_KEY_FILE on first use: prepare writes it
(`ensure_secret`), only workers read it.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Self

from fedsim.checkpoints import write_atomic
from fedsim.pipeline.base import Outgoing, Stage
from fedsim.pipeline.secagg import crypto, party
from fedsim.pipeline.secagg.vectors import flat, unflat
from fedsim.protocol import Masking, client_number
from fedsim.protocol.secagg import keys_from_json


def ensure_secret(path: Path) -> bool:
    """Write a new worker secret (64 hex digits, mode 0600) when `path` has none; True if so."""
    if path.exists():
        read_secret(path)  # a corrupt file is reported, never replaced silently
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, secrets.token_hex(crypto.SECRET_BYTES).encode() + b"\n")  # mode 0600
    return True


def read_secret(path: Path) -> bytes:
    """The worker secret in `path`. Raises ValueError naming the file and what to do."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise ValueError(
            f"SECAGG_KEY_FILE {path} does not exist: run prepare (it writes it) and give "
            "every worker the same file"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"SECAGG_KEY_FILE {path} cannot be read ({exc})") from None
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(
            f"SECAGG_KEY_FILE {path} is not 64 hex digits: delete it and rerun prepare"
        )
    return bytes.fromhex(text)


class Mask(Stage):
    """The worker's update, masked; the aggregator side passes through."""

    name = "secagg"

    def __init__(self, key_file: Path) -> None:
        self.key_file, self._secret = Path(key_file), b""

    @classmethod
    def from_settings(cls, settings: Any) -> Self | None:
        return cls(settings.secagg_key_file) if getattr(settings, "secagg", False) else None

    def secret(self) -> bytes:
        if not self._secret:
            self._secret = read_secret(self.key_file)
        return self._secret

    def worker(self, update: Outgoing) -> Outgoing:
        raw = update.task.get("secagg")
        if raw is None:
            raise ValueError("SECAGG=true but the task carries no masking: is SECAGG set alike?")
        masking = Masking.from_json(raw)
        client = client_number(str(update.task.get("client")))
        if client is None:
            raise ValueError("a masked update needs a planned client (client-N)")
        y = party.masked_input(
            self.secret(),
            client,
            int(update.task["round"]),
            bytes.fromhex(masking.nonce),
            flat(update.delta()),
            masking.weight or int(update.task["samples"]),
            keys_from_json(masking.keys),
        )
        meta = {**update.meta, "secagg": masking.nonce}
        return Outgoing(update.base, unflat(y, update.base), update.task, meta)
