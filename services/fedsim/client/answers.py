"""The aggregator's answers as a worker's transport returns them: a pull, an offer of
work, a push, a lookup. Each says whether every try failed, and how many retries it took."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedsim.protocol import Task

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True)
class Pulled:
    """The outcome of a pull. `tensors` None: every try failed (`error` says why), or
    `not_modified`: the copy named by the ETag sent is still current."""

    retries: int
    tensors: Tensors | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    error: str = ""
    etag: str = ""
    not_modified: bool = False
    bytes: int = 0  # the body's size on the wire

    @property
    def ok(self) -> bool:
        return self.tensors is not None or self.not_modified

    @property
    def version(self) -> int | None:
        return int(self.metadata["version"]) if "version" in self.metadata else None


@dataclass(frozen=True)
class Offer:
    """The aggregator's answer to a request for work. `reachable` False: every try failed."""

    reachable: bool
    task: Task | None = None
    worker: str = ""
    finished: bool = False
    surplus: bool = False
    reason: str = ""
    retry_after: float = 0.5
    retries: int = 0
    error: str = ""


@dataclass(frozen=True)
class Pushed:
    """The outcome of a push. `accepted` False with `status` None: every try failed."""

    accepted: bool
    retries: int
    version: int | None = None
    duplicate: bool = False
    status: int | None = None  # 409 when refused as stale or finished
    finished: bool = False
    detail: str = ""
    seq: int | None = None  # the update's sequence number; None while a round holds it
    bytes: int = 0  # the body's size on the wire (compressed, when a codec runs)


@dataclass(frozen=True)
class Looked:
    """What the aggregator says of an update: `state` saved, applied, pending or unknown.

    `state` "" means every try failed (`error` says why). An unknown update is
    `forgotten` when the aggregator knows it was saved long ago; else it was lost.
    """

    state: str
    retries: int
    version: int | None = None
    seq: int | None = None
    forgotten: bool = False
    error: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.state)
