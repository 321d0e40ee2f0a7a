"""The client's loop: pull the global model, train on a slice, push the weights.

`async-weighted` (the original): one pass over the client's slices; a failed pull
trains on the weights it has, a failed push keeps them and skips the next pull.
`fedavg`: one slice per round, cycling, until the aggregator says the run is
finished; an update based on an old version is refused (409) and the client
pulls again. Both log one line per step and return a `Summary`.

An accepted update is not forgotten at once: the client keeps it (metadata and
weights) until the aggregator says it is in a checkpoint. Before each pull, and
at the end of the run, it asks about each one kept; one the aggregator lost in a
hard kill is pushed again with the same update_id, which the aggregator counts
once. At the end it waits, bounded, for them to be saved.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedsim import models, weights
from fedsim.client.identity import Identity
from fedsim.client.training import Trained
from fedsim.client.transport import Pulled, Pushed, Transport
from fedsim.config import Settings

log = logging.getLogger("fedsim.client")

POLL_SECONDS = 0.5  # how often a fedavg client asks whether its round closed
STARTUP_SECONDS = 120.0  # how long a client waits for the aggregator to come up
SETTLE_SLACK = 5.0  # at the end, wait IDLE_SAVE_SECONDS plus this for the last checkpoint


class AggregatorUnreachable(RuntimeError):
    """The aggregator did not answer for longer than the client waits."""


class Learner(Protocol):
    def get_weights(self) -> dict[str, np.ndarray]: ...
    def set_weights(self, tensors: dict[str, np.ndarray]) -> None: ...
    def train(self, slice_no: int) -> Trained: ...


@dataclass
class Summary:
    slices_done: int = 0
    pushes_accepted: int = 0
    pushes_failed: int = 0
    pulls_failed: int = 0
    retries: int = 0
    rounds: int = 0
    repushed: int = 0  # accepted updates the aggregator lost, pushed again
    unconfirmed: int = 0  # accepted updates not known to be in a checkpoint at the end

    def line(self, client_id: str, seconds: float) -> str:
        unconfirmed = f", {self.unconfirmed} not confirmed saved" if self.unconfirmed else ""
        return (
            f"{client_id} done: {self.slices_done} slices trained, pushes "
            f"{self.pushes_accepted} accepted {self.pushes_failed} failed, "
            f"pulls {self.pulls_failed} failed, re-pushed {self.repushed}{unconfirmed}, "
            f"{self.retries} retries, {seconds:.1f}s"
        )


@dataclass(eq=False)  # compared by identity: its tensors have no plain ==
class Unconfirmed:
    """An accepted update kept until the aggregator says it is in a checkpoint."""

    tensors: dict[str, np.ndarray]
    meta: dict[str, object]
    seq: int | None  # its sequence number at the aggregator, once known


def finished(status: dict[str, Any]) -> bool:
    """Whether the aggregator's /v1/status says the run is over."""
    round_info = status.get("round")
    if isinstance(round_info, dict) and round_info.get("finished"):
        return True
    return bool(status.get("finished", False))


class Client:
    def __init__(
        self,
        settings: Settings,
        identity: Identity,
        transport: Transport,
        learner: Learner,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        new_update_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self.settings = settings
        self.identity = identity
        self.transport = transport
        self.learner = learner
        self.clock = clock
        self.sleep = sleep
        self.new_update_id = new_update_id
        self.summary = Summary()
        self.name = identity.client_id
        self.unconfirmed: list[Unconfirmed] = []  # a few at a time: most are saved soon
        self.last_accepted = clock()
        # The client's own initial weights are checkpoint 0's (same MODEL and SEED),
        # so before its first pull it trains from version 0.
        self.version = 0

    # --- shared steps -------------------------------------------------------------

    def wait_ready(self, timeout: float = STARTUP_SECONDS) -> str:
        """Wait for /healthz; return the strategy the aggregator runs."""
        deadline = self.clock() + timeout
        while (health := self.transport.health()) is None:
            if self.clock() >= deadline:
                raise AggregatorUnreachable(
                    f"no answer from the aggregator at {self.transport.base_url}/healthz "
                    f"for {timeout:.0f}s: is it running, and is AGGREGATOR_URL right?"
                )
            self.sleep(1.0)
        status = self.transport.status() or {}
        strategy = str(status.get("strategy") or self.settings.aggregation)
        if strategy != self.settings.aggregation:
            log.warning(
                "%s: the aggregator runs %s, AGGREGATION here says %s: following the aggregator",
                self.name,
                strategy,
                self.settings.aggregation,
            )
        log.info("%s: aggregator up at version %s (%s)", self.name, health.get("version"), strategy)
        return strategy

    def pull(self, slice_no: int) -> Pulled:
        pulled = self.transport.pull()
        self.summary.retries += pulled.retries
        if not pulled.ok:
            self.summary.pulls_failed += 1
            log.warning(
                "%s pull  slice %d failed after %d tries (%s): training on version %d it has",
                self.name,
                slice_no,
                pulled.retries + 1,
                pulled.error,
                self.version,
            )
            return pulled
        assert pulled.tensors is not None
        try:
            weights.validate(pulled.tensors, models.SHAPES[self.settings.model])
        except weights.WeightsError as exc:
            raise weights.WeightsError(
                exc.status,
                f"the aggregator serves a model that is not MODEL={self.settings.model} "
                f"({exc.reason}); give both the same MODEL",
            ) from None
        self.learner.set_weights(pulled.tensors)
        self.version = pulled.version if pulled.version is not None else self.version
        log.info(
            "%s pull  slice %d version %d (retries %d)",
            self.name,
            slice_no,
            self.version,
            pulled.retries,
        )
        return pulled

    def train(self, slice_no: int) -> Trained:
        trained = self.learner.train(slice_no)
        self.summary.slices_done += 1
        log.info(
            "%s train slice %d samples %d loss %.4f acc %.4f (%.1fs)",
            self.name,
            slice_no,
            trained.samples,
            trained.loss,
            trained.accuracy,
            trained.seconds,
        )
        return trained

    def metadata(self, trained: Trained, base_version: int) -> dict[str, object]:
        # A fresh update_id per trained update; every retry of it sends the same
        # bytes, so the aggregator can count it once.
        meta: dict[str, object] = {
            "client_id": self.name,
            "base_version": base_version,
            "num_samples": trained.samples,
            "update_id": self.new_update_id(),
            "slice": trained.slice,
            "slices": f"{self.identity.first}-{self.identity.last}",
            "retries": self.summary.retries,
        }
        # Metrics are optional; a diverged loss is left out rather than sent as NaN.
        for key, value in (("loss", trained.loss), ("accuracy", trained.accuracy)):
            if math.isfinite(value):
                meta[key] = f"{value:.6f}"
        return meta

    def push(self, tensors: dict[str, np.ndarray], meta: dict[str, object]) -> Pushed:
        """One push (MAX_RETRY tries); an accepted update is kept until it is saved."""
        pushed = self.transport.push(tensors, meta)
        self.summary.retries += pushed.retries
        slice_no, base = meta["slice"], meta["base_version"]
        if pushed.accepted:
            self.summary.pushes_accepted += 1
            self._keep(tensors, meta, pushed)
            log.info(
                "%s push  slice %s base %s -> version %s (retries %d)%s",
                self.name,
                slice_no,
                base,
                pushed.version,
                pushed.retries,
                " (already counted)"
                if pushed.duplicate
                else " (round open)"
                if pushed.version == base
                else "",
            )
        elif pushed.status == 409:
            log.info(
                "%s push  slice %s base %s refused: %s (version %s)",
                self.name,
                slice_no,
                base,
                "run finished" if pushed.finished else pushed.detail or "stale",
                pushed.version,
            )
        else:
            self.summary.pushes_failed += 1
            log.warning(
                "%s push  slice %s base %s failed after %d tries (%s): keeping the weights",
                self.name,
                slice_no,
                base,
                pushed.retries + 1,
                pushed.detail,
            )
        return pushed

    # --- accepted updates, until they are in a checkpoint ----------------------------

    def _keep(
        self, tensors: dict[str, np.ndarray], meta: dict[str, object], pushed: Pushed
    ) -> None:
        self.last_accepted = self.clock()
        for item in self.unconfirmed:
            if item.meta["update_id"] == meta["update_id"]:
                item.seq = pushed.seq if pushed.seq is not None else item.seq
                return
        self.unconfirmed.append(Unconfirmed(tensors, meta, pushed.seq))

    def confirm(self, *, attempts: int | None = None) -> bool:
        """Ask the aggregator about each update kept; False if it did not answer.

        saved (or forgotten as saved long ago): drop it; applied or pending: keep
        it; lost (unknown, not forgotten): push it again with the same update_id.
        """
        for item in list(self.unconfirmed):
            looked = self.transport.lookup(str(item.meta["update_id"]), item.seq, attempts=attempts)
            self.summary.retries += looked.retries
            if not looked.ok:
                log.warning(
                    "%s: could not ask about %d accepted updates (%s): keeping them",
                    self.name,
                    len(self.unconfirmed),
                    looked.error,
                )
                return False
            if looked.state == "saved" or (looked.state == "unknown" and looked.forgotten):
                self.unconfirmed.remove(item)
            elif looked.state == "unknown":
                if not self._repush(item):
                    return False
            elif looked.seq is not None:
                item.seq = looked.seq
        return True

    def _repush(self, item: Unconfirmed) -> bool:
        """Push a lost update again; False if the aggregator did not answer."""
        meta = item.meta
        pushed = self.transport.push(item.tensors, meta)
        self.summary.retries += pushed.retries
        if pushed.accepted:
            self.summary.repushed += 0 if pushed.duplicate else 1
            self.last_accepted = self.clock()
            item.seq = pushed.seq
            log.info(
                "%s re-push slice %s (lost in an aggregator restart) -> version %s%s",
                self.name,
                meta["slice"],
                pushed.version,
                " (already counted)" if pushed.duplicate else "",
            )
            return True
        if pushed.status == 409:
            # fedavg: its round is over or the run finished; it can no longer count.
            self.unconfirmed.remove(item)
            log.info(
                "%s re-push slice %s refused: %s (version %s)",
                self.name,
                meta["slice"],
                "run finished" if pushed.finished else pushed.detail or "stale",
                pushed.version,
            )
            return True
        log.warning(
            "%s re-push slice %s failed after %d tries (%s): keeping it",
            self.name,
            meta["slice"],
            pushed.retries + 1,
            pushed.detail,
        )
        return False

    def settle(self) -> None:
        """At the end: wait until the updates kept are in a checkpoint, bounded.

        The aggregator checkpoints at least IDLE_SAVE_SECONDS after its last change,
        so the wait ends IDLE_SAVE_SECONDS + SETTLE_SLACK after the last accepted
        push or re-push; what is still unconfirmed then is counted in the summary.
        """
        if self.unconfirmed:
            self.confirm()
        slack = self.settings.idle_save_seconds + SETTLE_SLACK
        start = self.clock()
        while self.unconfirmed and self.clock() < max(start, self.last_accepted) + slack:
            self.sleep(POLL_SECONDS)
            self.confirm(attempts=1)
        self.summary.unconfirmed = len(self.unconfirmed)
        if self.unconfirmed:
            log.warning(
                "%s: %d accepted updates not confirmed in a checkpoint after %.0fs",
                self.name,
                len(self.unconfirmed),
                self.clock() - start,
            )

    # --- async-weighted: one pass, the original loop ------------------------------

    def run_async(self) -> Summary:
        pull_next = True
        for slice_no in self.identity.slices:
            if pull_next:
                self.confirm()
                self.pull(slice_no)
            trained = self.train(slice_no)
            pushed = self.push(self.learner.get_weights(), self.metadata(trained, self.version))
            if pushed.finished:
                break
            # After a failed push the weights hold work the aggregator lacks: keep
            # training on them rather than overwrite them with the global model.
            pull_next = pushed.accepted
        self.settle()
        return self.summary

    # --- fedavg: one slice per round until the run is finished --------------------

    def run_fedavg(self) -> Summary:
        lost_after = max(60.0, 2 * self.settings.round_timeout)
        slices = itertools.cycle(self.identity.slices)
        slice_no = next(slices)
        while True:
            status = self._status_within(lost_after)
            if finished(status):
                log.info("%s: the run is finished at version %s", self.name, status.get("version"))
                self.settle()
                return self.summary
            self.confirm()
            pulled = self.pull(slice_no)
            if not pulled.ok:
                self.sleep(POLL_SECONDS)
                continue
            base = self.version
            trained = self.train(slice_no)
            tensors, meta = self.learner.get_weights(), self.metadata(trained, base)
            if self._push_until_round_moves(tensors, meta, base, lost_after) == "finished":
                log.info("%s: the run is finished", self.name)
                self.settle()
                return self.summary
            slice_no = next(slices)

    def _status_within(self, lost_after: float) -> dict[str, Any]:
        since = self.clock()
        while (status := self.transport.status()) is None:
            if self.clock() - since >= lost_after:
                raise AggregatorUnreachable(
                    f"the aggregator at {self.transport.base_url} did not answer "
                    f"for {lost_after:.0f}s"
                )
            self.sleep(POLL_SECONDS)
        return status

    def _push_until_round_moves(
        self, tensors: dict[str, np.ndarray], meta: dict[str, object], base: int, lost_after: float
    ) -> str:
        """Push, then wait for the version to move past `base`: 'next' or 'finished'.

        Every few seconds an update not yet accepted is pushed again, and the kept
        accepted ones are asked about (`confirm`), which pushes one again if the
        aggregator restarted without it; the same update_id keeps it from counting twice.
        """
        every = max(5 * POLL_SECONDS, self.settings.max_wait)
        accepted = False
        last_push = last_contact = self.clock()
        pushed = self.push(tensors, meta)
        while True:
            if pushed.status == 409:
                return "finished" if pushed.finished else "next"
            if pushed.accepted and not accepted:
                accepted = True
                self.summary.rounds += 1
            self.sleep(POLL_SECONDS)
            status = self.transport.status(attempts=1)
            now = self.clock()
            if status is not None:
                last_contact = now
                if finished(status):
                    return "finished"
                if int(status.get("version", base)) > base:
                    return "next"
            elif now - last_contact >= lost_after:
                raise AggregatorUnreachable(
                    f"the aggregator at {self.transport.base_url} did not answer "
                    f"for {lost_after:.0f}s"
                )
            if now - last_push < every:
                continue
            last_push = now
            if accepted:
                self.confirm(attempts=1)
            else:
                log.info("%s: version still %d, pushing the same update again", self.name, base)
                pushed = self.push(tensors, meta)
