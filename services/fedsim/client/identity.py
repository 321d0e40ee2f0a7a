"""Which range of CLIENT_SLICES this client trains on.

In order: `CLIENT_INDEX` when set (a local runner or Swarm sets it); else the
replica number k of the Compose container name `<project>-client-<k>`, which
Docker's embedded DNS returns for a reverse lookup of the container's own
address; else, started by hand in a terminal without a slice plan, the original
prompts `Client Id:` and `Dataset Range:`. Anything else stops with a message
naming the settings to set.
"""

from __future__ import annotations

import re
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass

from fedsim.config import ConfigError, Settings
from fedsim.data import mnist

# Compose v2 names replicas "<project>-client-<k>", v1 "<project>_client_<k>"; the
# reverse lookup may append ".<network>". Replicas count from 1: a 0 would pick the
# last range through a negative index.
_CONTAINER = re.compile(r"^.+[-_]client[-_]([1-9]\d*)(?:\..*)?$")


@dataclass(frozen=True)
class Identity:
    index: int  # the client's number, 1-based: the k of replica k or the typed Client Id
    first: int  # first slice of its range, 1-based, inclusive
    last: int  # last slice, inclusive
    source: str  # how the index was found, for the log

    @property
    def client_id(self) -> str:
        return f"client-{self.index}"

    @property
    def slices(self) -> range:
        return range(self.first, self.last + 1)

    def describe(self, num_images_train: int) -> str:
        """E.g. 'client-2: slices 5-8 (samples 20000-39999)'."""
        start = mnist.slice_range(self.first, num_images_train)[0]
        stop = mnist.slice_range(self.last, num_images_train)[1]
        return f"{self.client_id}: slices {self.first}-{self.last} (samples {start}-{stop - 1})"


def parse_container_name(name: str) -> int | None:
    """The replica number in a Compose container name, or None."""
    match = _CONTAINER.match(name.strip())
    return int(match.group(1)) if match else None


def container_names() -> list[str]:
    """Names the DNS gives for this host's own address; empty when it gives none."""
    try:
        address = socket.gethostbyname(socket.gethostname())
        name, aliases, _ = socket.gethostbyaddr(address)
    except OSError:  # socket.herror and socket.gaierror are OSErrors
        return []
    return [name, *aliases]


def replica_from_dns(lookup: Callable[[], list[str]] = container_names) -> int | None:
    for name in lookup():
        index = parse_container_name(name)
        if index is not None:
            return index
    return None


def _ask(settings: Settings, ask: Callable[[str], str], say: Callable[[str], None]) -> Identity:
    """The original prompts; invalid input is explained and asked again."""
    n = settings.num_slices
    while True:
        raw = ask("Client Id: ").strip()
        if raw.isdigit() and int(raw) >= 1:
            index = int(raw)
            break
        say(f"Client Id must be a positive integer, got {raw!r}")
    while True:
        raw = ask("Dataset Range: ").split()
        if len(raw) == 2 and all(part.isdigit() for part in raw):
            first, last = int(raw[0]), int(raw[1])
            if 1 <= first <= last <= n:
                return Identity(index, first, last, "typed in")
        say(f"Dataset Range is two integers l r with 1 <= l <= r <= {n}, e.g. '1 4'")


def resolve(
    settings: Settings,
    *,
    lookup: Callable[[], list[str]] = container_names,
    isatty: Callable[[], bool] = lambda: sys.stdin.isatty(),
    ask: Callable[[str], str] = input,
    say: Callable[[str], None] = print,
) -> Identity:
    """This client's index and range. Raises ConfigError when it cannot be told."""
    plan = " ".join(f"{lo}-{hi}" for lo, hi in settings.client_slices)
    if settings.client_index is not None:
        index, source = settings.client_index, "CLIENT_INDEX"
    else:
        index, source = replica_from_dns(lookup), "container name"
    if index is None:
        if isatty() and "CLIENT_SLICES" not in settings.explicit:
            try:
                return _ask(settings, ask, say)
            except EOFError:
                pass  # input closed before an answer: fall through to the message
        raise ConfigError(
            "CLIENT_INDEX",
            "",
            "cannot tell which range of CLIENT_SLICES this client takes: set CLIENT_INDEX "
            "(1-based), run it as a Compose replica '<project>-client-<k>', or start it in a "
            "terminal without CLIENT_SLICES to be asked",
        )
    if index > len(settings.client_slices):
        raise ConfigError(
            "CLIENT_SLICES",
            plan,
            f'replica {index} has no range in CLIENT_SLICES "{plan}" '
            f"({len(settings.client_slices)} ranges): scale the clients down to "
            f"{len(settings.client_slices)} or add a range",
        )
    first, last = settings.client_slices[index - 1]
    return Identity(index, first, last, source)
