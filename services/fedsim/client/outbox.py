"""Updates a worker keeps until the aggregator says they are in a checkpoint.

An accepted update is not forgotten at once: a hard kill of the aggregator loses
what it accepted since its last checkpoint. Before each request for work, and at
the end, the worker asks about each update kept (`GET /v1/updates/<id>`): saved
ones are dropped, lost ones are pushed again with the same id, which the
aggregator counts once. An update whose push failed (aggregator unreachable) is
kept too, and pushed again first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedsim.client.answers import Pushed
from fedsim.client.transport import Transport
from fedsim.protocol import UpdateMeta

log = logging.getLogger("fedsim.client")

POLL_SECONDS = 0.5  # between two rounds of questions while waiting for a checkpoint
SETTLE_SLACK = 5.0  # at the end, wait IDLE_SAVE_SECONDS plus this for the last checkpoint


@dataclass(eq=False)  # compared by identity: its tensors have no plain ==
class Kept:
    tensors: dict[str, np.ndarray]
    meta: UpdateMeta
    seq: int | None  # its sequence number at the aggregator, once known
    sent: bool  # accepted once; False: every push so far failed


@dataclass
class Counts:
    pushes_accepted: int = 0
    pushes_failed: int = 0
    pushes_refused: int = 0
    repushed: int = 0
    retries: int = 0
    unconfirmed: int = 0
    bytes_pushed: int = 0  # update bodies the aggregator answered, as sent (compressed)
    bytes_pulled: int = 0  # model bodies downloaded


def describe(client_id: str, slice_no: object = None, round_no: int | None = None) -> str:
    """'client-2 slice 5' or 'client-17 round 3': what an update is, for log lines."""
    what = f" slice {slice_no}" if slice_no is not None else ""
    if round_no is not None:
        what += f" round {round_no}"
    return f"{client_id}{what}"


def _what(meta: UpdateMeta) -> str:
    return describe(meta.client_id, meta.slice, meta.round)


class Outbox:
    def __init__(
        self,
        name: str,
        transport: Transport,
        counts: Counts,
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], None],
        idle_save_seconds: float,
    ) -> None:
        self.name, self.transport, self.counts = name, transport, counts
        self.clock, self.sleep = clock, sleep
        self.idle_save_seconds = idle_save_seconds
        self.kept: list[Kept] = []
        self.last_accepted = clock()
        # The aggregator answered, but cannot take updates now (503: checkpoints cannot
        # be written); the worker waits for it rather than giving it up as gone.
        self.busy = False

    def push(self, tensors: dict[str, np.ndarray], meta: UpdateMeta, note: str = "") -> Pushed:
        """One push (MAX_RETRY tries), logged with `note` (a slow client's wait); accepted
        or unsent updates are kept."""
        pushed = self.transport.push(tensors, meta)
        self.counts.retries += pushed.retries
        self.counts.bytes_pushed += pushed.bytes
        what, base = _what(meta), meta.base_version
        if pushed.accepted:
            self.counts.pushes_accepted += 1
            self._keep(tensors, meta, pushed)
            shown = (
                " (already counted)"
                if pushed.duplicate
                else " (round open)"
                if pushed.seq is None and pushed.version == base
                else ""
            )
            log.info(
                "%s %s push  base %s -> version %s (%s, %d bytes, retries %d)%s%s",
                self.name,
                what,
                base,
                pushed.version,
                meta.stages.get("codec", "float32"),
                pushed.bytes,
                pushed.retries,
                shown,
                note,
            )
        elif pushed.status == 409:
            self.counts.pushes_refused += 1
            log.info(
                "%s %s push  base %s refused: %s (version %s)",
                self.name,
                what,
                base,
                "run finished" if pushed.finished else pushed.detail or "stale",
                pushed.version,
            )
        else:
            self.counts.pushes_failed += 1
            self.busy = pushed.detail == "HTTP 503"
            self.kept.append(Kept(tensors, meta, None, sent=False))
            log.warning(
                "%s %s push  base %s failed after %d tries (%s): keeping it to push again",
                self.name,
                what,
                base,
                pushed.retries + 1,
                pushed.detail,
            )
        return pushed

    def _keep(self, tensors: dict[str, np.ndarray], meta: UpdateMeta, pushed: Pushed) -> None:
        self.last_accepted = self.clock()
        for item in self.kept:
            if item.meta.update_id == meta.update_id:
                item.seq = pushed.seq if pushed.seq is not None else item.seq
                item.sent = True
                return
        self.kept.append(Kept(tensors, meta, pushed.seq, sent=True))

    def confirm(self, *, attempts: int | None = None) -> bool:
        """Ask about each update kept, push unsent or lost ones; False if unreachable.

        saved (or forgotten as saved long ago): drop it; applied or pending: keep
        it; lost (unknown, not forgotten): push it again with the same update_id.
        """
        self.busy = False
        for item in list(self.kept):
            if not item.sent:
                if not self._repush(item, "not sent"):
                    return False
                continue
            looked = self.transport.lookup(item.meta.update_id, item.seq, attempts=attempts)
            self.counts.retries += looked.retries
            if not looked.ok:
                log.warning(
                    "%s: could not ask about %d kept updates (%s): keeping them",
                    self.name,
                    len(self.kept),
                    looked.error,
                )
                return False
            if looked.state == "saved" or (looked.state == "unknown" and looked.forgotten):
                self.kept.remove(item)
            elif looked.state == "unknown":
                if not self._repush(item, "lost in an aggregator restart"):
                    return False
            elif looked.seq is not None:
                item.seq = looked.seq
        return True

    def _repush(self, item: Kept, why: str) -> bool:
        """Push a kept update again; False if the aggregator did not answer."""
        meta = item.meta
        pushed = self.transport.push(item.tensors, meta)
        self.counts.retries += pushed.retries
        self.counts.bytes_pushed += pushed.bytes
        if pushed.accepted:
            self.counts.repushed += 0 if pushed.duplicate else 1
            self.last_accepted = self.clock()
            item.seq, item.sent = pushed.seq, True
            log.info(
                "%s %s re-push (%s) -> version %s%s",
                self.name,
                _what(meta),
                why,
                pushed.version,
                " (already counted)" if pushed.duplicate else "",
            )
            return True
        if pushed.status == 409:
            # Its task went to another worker, its round closed or the run finished:
            # it can no longer count, and nothing of it was counted.
            self.kept.remove(item)
            log.info(
                "%s %s re-push refused: %s (version %s)",
                self.name,
                _what(meta),
                "run finished" if pushed.finished else pushed.detail or "stale",
                pushed.version,
            )
            return True
        self.busy = pushed.detail == "HTTP 503"
        log.warning(
            "%s %s re-push failed after %d tries (%s): keeping it",
            self.name,
            _what(meta),
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
        if self.kept:
            self.confirm()
        slack = self.idle_save_seconds + SETTLE_SLACK
        start = self.clock()
        while self.kept and self.clock() < max(start, self.last_accepted) + slack:
            self.sleep(POLL_SECONDS)
            self.confirm(attempts=1)
        self.counts.unconfirmed = len(self.kept)
        if self.kept:
            log.warning(
                "%s: %d accepted updates not confirmed in a checkpoint after %.0fs",
                self.name,
                len(self.kept),
                self.clock() - start,
            )
