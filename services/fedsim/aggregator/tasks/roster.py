"""The plan's logical clients as the aggregator holds them: columns of numbers, not records.

partitions.json describes each client by its size, label histogram, the SHA-256 of its
indices and (slices) its range. Held as one dict per client, as JSON reads it, that is
about 0.5 kB each (1,000 s of small ints, strings and dicts); the aggregator keeps
instead one numpy array per field:

    samples int32 (4 B), sha256 32 raw bytes (32 B), labels 10 x int32 (40 B),
    slices 2 x int32 (8 B, PARTITION=slices only)

so 10,000 clients take under 1 MB (`nbytes`). A `Client` (tasks/ids.py) is made when
asked for, by position (`roster[i]`, a Sequence in plan order) or by number
(`roster.by_number`, a Mapping from 1 to N, what the queues look clients up in).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, overload

import numpy as np

from fedsim.aggregator.tasks.ids import Client

CLASSES = 10  # MNIST's digits: the length of a label histogram


class Roster(Sequence[Client]):
    """The plan's clients in plan order; client number n is `roster[n - 1]`."""

    def __init__(
        self,
        samples: np.ndarray,
        sha256: np.ndarray,
        labels: np.ndarray | None = None,
        slices: np.ndarray | None = None,
    ) -> None:
        n = len(samples)
        self.samples = np.asarray(samples, dtype=np.int32)
        self.sha256 = np.asarray(sha256, dtype=np.uint8).reshape(n, 32)
        self.labels = (
            np.zeros((n, CLASSES), np.int32)
            if labels is None
            else np.asarray(labels, dtype=np.int32).reshape(n, CLASSES)
        )
        self.slices = None if slices is None else np.asarray(slices, np.int32).reshape(n, 2)
        for column in (self.samples, self.sha256, self.labels, self.slices):
            if column is not None:
                column.setflags(write=False)
        self.by_number: Mapping[int, Client] = _ByNumber(self)
        self.samples_by_id: Mapping[str, int] = _SamplesById(self)  # the quota's shares

    @classmethod
    def of(cls, entries: Sequence[Mapping[str, Any]]) -> Roster:
        """The roster of partitions.json's `clients` (checked by partition.read)."""
        n = len(entries)
        samples = np.fromiter((e["samples"] for e in entries), np.int64, n)
        if samples.size and samples.max() > np.iinfo(np.int32).max:
            raise ValueError("a client's samples do not fit in 32 bits")
        sha = np.frombuffer(b"".join(bytes.fromhex(e["sha256"]) for e in entries), np.uint8)
        labels = np.array([e["labels"] for e in entries], np.int64).reshape(n, CLASSES)
        slices = None
        if n and "slices" in entries[0]:
            slices = np.array([e["slices"] for e in entries], np.int64).reshape(n, 2)
        return cls(samples, sha, labels, slices)

    @classmethod
    def of_clients(cls, clients: Sequence[Client]) -> Roster:
        """A roster of `clients` numbered 1..N in order (label histograms unknown: zeros)."""
        for i, c in enumerate(clients, 1):
            if c.number != i:
                raise ValueError(f"client {c.id} is at position {i}: a roster is numbered 1..N")
        sha = np.frombuffer(b"".join(bytes.fromhex(c.sha256) for c in clients), np.uint8)
        slices = None
        if clients and clients[0].slices is not None:
            slices = np.array([c.slices for c in clients], np.int64)
        return cls(np.array([c.samples for c in clients], np.int64), sha, None, slices)

    def __len__(self) -> int:
        return len(self.samples)

    @overload
    def __getitem__(self, i: int) -> Client: ...
    @overload
    def __getitem__(self, i: slice) -> list[Client]: ...
    def __getitem__(self, i: int | slice) -> Client | list[Client]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"client position {i} is not in 0-{n - 1}")
        i %= n
        span = None if self.slices is None else (int(self.slices[i, 0]), int(self.slices[i, 1]))
        return Client(i + 1, int(self.samples[i]), self.sha256[i].tobytes().hex(), span)

    def label_counts(self, number: int) -> list[int]:
        """Client `number`'s label histogram, as partitions.json gives it."""
        return [int(x) for x in self.labels[number - 1]]

    @property
    def nbytes(self) -> int:
        """The bytes its columns hold: what grows with the number of clients."""
        columns = (self.samples, self.sha256, self.labels, self.slices)
        return sum(c.nbytes for c in columns if c is not None)


def number_of(client_id: object, count: int) -> int | None:
    """N of "client-N" when 1 <= N <= `count` (one spelling: ASCII, no leading zero)."""
    if not isinstance(client_id, str) or not client_id.startswith("client-"):
        return None
    digits = client_id[7:]
    if not digits.isascii() or not digits.isdigit() or digits.startswith("0"):
        return None
    number = int(digits)
    return number if number <= count else None


def by_number(clients: Sequence[Client]) -> Mapping[int, Client]:
    """`clients` by number: a roster's view (each Client made when asked), else a dict."""
    return clients.by_number if isinstance(clients, Roster) else {c.number: c for c in clients}


class _ByNumber(Mapping[int, Client]):
    """A roster's clients by number, 1..N."""

    def __init__(self, roster: Roster) -> None:
        self._roster = roster

    def __getitem__(self, number: int) -> Client:
        if number not in self:
            raise KeyError(number)
        return self._roster[int(number) - 1]

    def __contains__(self, number: object) -> bool:
        if isinstance(number, bool) or not isinstance(number, int | np.integer):
            return False
        return 1 <= number <= len(self._roster)

    def __iter__(self) -> Iterator[int]:
        return iter(range(1, len(self._roster) + 1))

    def __len__(self) -> int:
        return len(self._roster)


class _SamplesById(Mapping[str, int]):
    """A roster's samples by client id ("client-N")."""

    def __init__(self, roster: Roster) -> None:
        self._roster = roster

    def __getitem__(self, client_id: str) -> int:
        number = number_of(client_id, len(self._roster))
        if number is None:
            raise KeyError(client_id)
        return int(self._roster.samples[number - 1])

    def __iter__(self) -> Iterator[str]:
        return (f"client-{n}" for n in range(1, len(self._roster) + 1))

    def __len__(self) -> int:
        return len(self._roster)
