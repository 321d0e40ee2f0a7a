"""Tokens: who may change the aggregator's state, and for which logical clients.

The file (TOKENS_FILE, JSON) holds one entry per token:

    {"format": 1, "tokens": [
      {"name": "workers", "token": "<64 hex digits>", "clients": ["*"]},
      {"name": "alice", "token": "<64 hex digits>", "clients": ["alice"]}]}

A request that changes state carries `Authorization: Bearer <token>`. "*" speaks
for every client id (the workers' token: tasks name any logical client); any
other entry only for the ids it lists, so a hand-started client cannot push as
another. `prepare` creates the file with a workers' token when there is none;
`python -m fedsim.tokens add alice` adds a token for a hand-started client.
Tokens are compared in constant time.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import re
import secrets
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ANY = "*"
FORMAT = 1
_TOKEN = re.compile(r"^[0-9a-f]{32,128}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@ -]{0,63}$")


class TokenError(ValueError):
    """The tokens file is missing, unreadable or malformed; one line says which and why."""


@dataclass(frozen=True)
class Token:
    name: str
    secret: str
    clients: frozenset[str]

    def speaks_for(self, client_id: str) -> bool:
        return ANY in self.clients or client_id in self.clients

    @property
    def for_workers(self) -> bool:
        return ANY in self.clients


def new_secret() -> str:
    return secrets.token_hex(32)


def read(path: Path) -> list[Token]:
    """The tokens in `path`, validated. Raises TokenError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenError(
            f"no tokens file at {path}: run `python -m fedsim.prepare` (or `docker compose up`, "
            "which runs the prepare service) first"
        ) from None
    except (OSError, ValueError, RecursionError) as exc:
        raise TokenError(f"{path}: not a readable JSON tokens file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TokenError(f'{path}: expected {{"format": {FORMAT}, "tokens": [...]}}')
    entries = data.get("tokens")
    if not isinstance(entries, list) or not entries:
        raise TokenError(f"{path}: no tokens")
    out: list[Token] = []
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise TokenError(f"{path}: token {i} is not an object")
        name, secret, clients = entry.get("name"), entry.get("token"), entry.get("clients")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise TokenError(f"{path}: token {i} has no valid name")
        if not isinstance(secret, str) or not _TOKEN.fullmatch(secret):
            raise TokenError(f"{path}: token {name!r} must be 32-128 lowercase hex digits")
        if (
            not isinstance(clients, list)
            or not clients
            or not all(isinstance(c, str) and 0 < len(c) <= 128 for c in clients)
        ):
            raise TokenError(f'{path}: token {name!r} needs a list of client ids (or "*")')
        out.append(Token(name, secret, frozenset(clients)))
    if len({t.secret for t in out}) != len(out):
        raise TokenError(f"{path}: the same token appears twice")
    return out


def _write(path: Path, tokens: Iterable[Token]) -> None:
    from fedsim.checkpoints import write_atomic

    body = {
        "format": FORMAT,
        "tokens": [
            {"name": t.name, "token": t.secret, "clients": sorted(t.clients)} for t in tokens
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # write_atomic creates the file with os.open(..., 0o600) (mkstemp) before the first
    # byte: the secrets are never readable by another user, whatever the umask.
    write_atomic(path, (json.dumps(body, indent=2) + "\n").encode())


def ensure(path: Path) -> bool:
    """Create `path` with a workers' token when it does not exist. True if created."""
    if path.exists():
        read(path)  # a broken file stops here, with its reason
        return False
    _write(path, [Token("workers", new_secret(), frozenset({ANY}))])
    return True


def add(path: Path, name: str, clients: Sequence[str]) -> Token:
    """Append a token for `clients` (default: the name itself) and return it."""
    tokens = read(path)
    if not _NAME.fullmatch(name):
        raise TokenError(f"token name {name!r}: 1-64 letters, digits, or _.@- and spaces")
    if any(t.name == name for t in tokens):
        raise TokenError(f"{path}: a token named {name!r} exists already")
    token = Token(name, new_secret(), frozenset(clients or [name]))
    _write(path, [*tokens, token])
    return token


def find(tokens: Iterable[Token], presented: str) -> Token | None:
    """The token matching `presented`, compared in constant time against every one."""
    found = None
    for token in tokens:
        if hmac.compare_digest(token.secret.encode(), presented.encode()):
            found = token
    return found


class Store:
    """The tokens of a file, read again when the file changes (a token added while the
    aggregator runs works at once); a file broken meanwhile keeps the last good ones."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tokens = read(path)
        self._stamp = self._stat()

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def find(self, presented: str) -> Token | None:
        stamp = self._stat()
        if stamp is not None and stamp != self._stamp:
            self._stamp = stamp
            # A broken file keeps the tokens that worked; prepare or the CLI fixes it.
            with contextlib.suppress(TokenError):
                self.tokens = read(self.path)
        return find(self.tokens, presented)


def workers_secret(path: Path) -> str:
    """The workers' token ("*") in `path`. Raises TokenError."""
    for token in read(path):
        if token.for_workers:
            return token.secret
    raise TokenError(f'{path}: no token for all clients ("*") for the workers')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedsim.tokens", description="List or add aggregator tokens."
    )
    parser.add_argument("--file", type=Path, help="the tokens file (default: TOKENS_FILE)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="names and client ids of the tokens (not the secrets)")
    sub.add_parser("init", help="create the file with a workers' token, if it does not exist")
    adding = sub.add_parser("add", help="add a token for a hand-started client; prints it")
    adding.add_argument("name")
    adding.add_argument("--clients", default="", help="comma-separated client ids (default: NAME)")
    args = parser.parse_args(argv)
    if args.file is None:
        from fedsim import config

        args.file = config.load().tokens_file
    try:
        if args.command == "init":
            created = ensure(args.file)
            print(f"{args.file}: {'created' if created else 'exists already; left as it is'}")
        elif args.command == "list":
            for token in read(args.file):
                print(f"{token.name}: {', '.join(sorted(token.clients))}")
        else:
            clients = [c.strip() for c in args.clients.split(",") if c.strip()]
            token = add(args.file, args.name, clients)
            print(token.secret)
            print(
                f"added token {token.name!r} for {', '.join(sorted(token.clients))} to "
                f"{args.file}; give it to the client as CLIENT_TOKEN",
                file=sys.stderr,
            )
    except TokenError as exc:
        print(f"fedsim tokens: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
