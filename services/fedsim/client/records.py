"""What a worker holds besides its loop: the learner it drives (the interface the Trainer of
training.py implements, and tests fake), its copy of a global model, and its summary line."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from fedsim.client.outbox import Counts
from fedsim.client.training import Trained
from fedsim.protocol import TrainSettings


class Learner(Protocol):
    labels: np.ndarray

    def train(
        self,
        tensors: Mapping[str, np.ndarray],
        indices: np.ndarray,
        settings: TrainSettings,
        seed: int,
        *,
        labels: np.ndarray | None = None,
    ) -> tuple[dict[str, np.ndarray], Trained]: ...

    def evaluate(self, tensors: Mapping[str, np.ndarray]) -> tuple[float, float, float]: ...


@dataclass
class Summary:
    trained: int = 0
    evaluations: int = 0
    dropped: int = 0  # training tasks whose client dropped out (DROPOUT)
    diverged: int = 0  # training tasks that gave non-finite weights (the run stops)
    pulls_failed: int = 0
    clients: list[str] = field(default_factory=list)
    counts: Counts = field(default_factory=Counts)

    def line(self, name: str, seconds: float) -> str:
        c = self.counts
        shown = ", ".join(self.clients[:5]) + (", ..." if len(self.clients) > 5 else "")
        unconfirmed = f", {c.unconfirmed} not confirmed saved" if c.unconfirmed else ""
        return (
            f"{name} done: {self.trained} updates trained"
            f"{f' ({shown})' if shown else ''}, {self.evaluations} evaluation"
            f"{'' if self.evaluations == 1 else 's'}"
            f"{f', {self.dropped} dropped' if self.dropped else ''}"
            f"{f', {self.diverged} diverged' if self.diverged else ''}, pushes "
            f"{c.pushes_accepted} accepted {c.pushes_failed} failed {c.pushes_refused} refused, "
            f"pulls {self.pulls_failed} failed, re-pushed {c.repushed}{unconfirmed}, "
            f"{c.retries} retries, bytes pushed {c.bytes_pushed} pulled {c.bytes_pulled}, "
            f"{seconds:.1f}s"
        )


@dataclass
class LocalModel:
    """The worker's copy of a global model version."""

    version: int = -1
    etag: str = ""
    tensors: dict[str, np.ndarray] | None = None
    fp16: bool = False  # pulled in half precision (COMPRESSION_DOWN=fp16), widened
