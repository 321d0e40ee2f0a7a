"""How a worker acts out its task's logical client: a slow client's wait, its dropouts, and
a training that diverged.

A training task carries its client's `Profile` (its line of clients.json, see
`fedsim.data.population`) unless every client is equal. Under CLOCK=real a slow client
really takes longer: after training, the worker waits

    wait = (max(speed - 1, 0) x measured training seconds + (bytes down + bytes up) / bandwidth)
           / TIME_SCALE

real seconds, so a client of speed 3 takes three times its worker's training time (a
worker cannot make a client faster than itself: speeds below 1 wait nothing for compute).
The bytes are the model pulled and the update pushed, as a real client would move them
on every task. A task drops when the draw of its seed and attempt falls below the
client's dropout, so the same task drops the same way whichever worker takes it. Under
CLOCK=virtual nobody waits: the aggregator orders the updates by their simulated time.
A training that gives non-finite weights is reported, not pushed: the aggregator stops
the run there (a model that diverges on a client has nothing to publish from it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedsim.data.population import drop_draw
from fedsim.protocol import Dropout, Profile, TrainTask

log = logging.getLogger("fedsim.client")


class GivesBack(Protocol):
    def give_back(self, dropped: Dropout) -> tuple[int | None, dict, int]: ...


def drops(task: TrainTask) -> bool:
    """Whether this attempt of the task fails: its client's dropout against the task's draw."""
    profile = task.profile
    return (
        profile is not None
        and profile.dropout > 0
        and drop_draw(task.seed, task.attempt or 0) < profile.dropout
    )


def drop(name: str, what: str, task: TrainTask, transport: GivesBack, uid: str) -> int:
    """Act out a dropped task: abort gives it back to the aggregator, which offers it again;
    silent says nothing, and its lease runs out after TASK_TIMEOUT. The retries it took."""
    assert task.profile is not None
    mode, attempt = task.profile.dropout_mode, task.attempt or 0
    log.info(
        "%s %s dropout (p %.2f, attempt %d): %s",
        name,
        what,
        task.profile.dropout,
        attempt,
        "giving the task back" if mode == "abort" else "silent until its lease runs out",
    )
    if mode != "abort":
        return 0
    retries, refused = _give_back(transport, Dropout(uid, task.id, task.lease))
    if refused is not None:
        log.info(
            "%s %s dropout not taken back (%s): its lease runs out instead", name, what, refused
        )
    return retries


def _give_back(transport: GivesBack, dropped: Dropout) -> tuple[int, str | None]:
    """POST `dropped`: (the retries it took, why it was not taken, or None when it was)."""
    status, answer, retries = transport.give_back(dropped)
    return retries, None if status == 200 else str(answer.get("detail") or "no answer")


def non_finite(tensors: Mapping[str, np.ndarray]) -> str | None:
    """The name of the first tensor holding a NaN or an infinity, or None."""
    for name, tensor in tensors.items():
        if not np.isfinite(tensor).all():
            return name
    return None


def diverged(
    name: str, what: str, task: TrainTask, transport: GivesBack, uid: str, where: str, loss: float
) -> int:
    """Report a training whose weights came out non-finite (`where`: the tensor, the version
    it started from): the aggregator stops the run. The retries it took."""
    shown = f"loss {loss:.4g}" if np.isfinite(loss) else "loss not finite"
    detail = f"non-finite weights in {where}, {shown}"[: Dropout.MAX_DETAIL]
    log.error("%s %s diverged: %s; reported, the run stops", name, what, detail)
    retries, refused = _give_back(transport, Dropout(uid, task.id, task.lease, detail))
    if refused is not None:
        log.warning("%s %s: the aggregator did not take the report (%s)", name, what, refused)
    return retries


def nbytes(tensors: Mapping[str, np.ndarray]) -> int:
    """The bytes of a model's weights: what a client downloads or uploads."""
    return sum(int(t.nbytes) for t in tensors.values())


@dataclass(frozen=True)
class Wait:
    """The real seconds a worker waits after training, and what they are made of."""

    seconds: float = 0.0
    compute: float = 0.0  # simulated seconds beyond the measured training time
    network: float = 0.0  # simulated seconds of the pull and the push
    profile: Profile | None = None

    def note(self) -> str:
        """For the push line: ' (as a x3.00 client: waited 12.3s = compute 10.0s + network
        2.3s at TIME_SCALE 1)', or '' when there was no wait."""
        if self.profile is None or self.seconds <= 0:
            return ""
        return (
            f" (as a x{self.profile.speed:.2f} client: waited {self.seconds:.1f}s = compute "
            f"{self.compute:.1f}s + network {self.network:.1f}s at TIME_SCALE "
            f"{self.profile.time_scale:g})"
        )


def wait(
    profile: Profile | None,
    trained_seconds: float,
    model: Mapping[str, np.ndarray],
    update: Mapping[str, np.ndarray],
    sleep: Callable[[float], None],
) -> Wait:
    """Wait as the task's client would after training on `model` into `update`; the wait."""
    pace = wait_after(profile, trained_seconds, nbytes(model), nbytes(update))
    if pace.seconds > 0:
        sleep(pace.seconds)
    return pace


def wait_after(profile: Profile | None, trained_seconds: float, down: int, up: int) -> Wait:
    """How long to wait after training `trained_seconds`, pulling `down` and pushing `up`
    bytes, as the task's client (nothing without a profile or under CLOCK=virtual)."""
    if profile is None or profile.clock != "real":
        return Wait()
    compute = max(profile.speed - 1.0, 0.0) * max(trained_seconds, 0.0)
    network = (down + up) / profile.bandwidth if profile.bandwidth else 0.0
    return Wait((compute + network) / profile.time_scale, compute, network, profile)
