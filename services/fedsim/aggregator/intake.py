"""How an update reaches a version: new or a retry (`seen`), then taken by an asynchronous
rule or waiting in a round.

An asynchronous rule takes each update as it arrives and makes a version of it
(or holds it, as fedbuff does until it has K); at the end of the run what it
still holds is flushed into a last version. A round rule's update waits in its
round, and the round becomes one version at its first C arrivals or at its deadline
with a quorum; short of it at the deadline, the round is tried again (tasks/rounds.py). Both go
through the core's `rule_step` (the rule's step, checked) and `apply` (publish).
The caller holds the state's lock.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

from fedsim import checkpoints, pipeline, weights
from fedsim.aggregator import privacy, secure, tasks
from fedsim.aggregator.evaluations import Evaluations
from fedsim.aggregator.events import Events
from fedsim.aggregator.ledger import Ledger
from fedsim.aggregator.metrics import Recorder
from fedsim.aggregator.saving import Saver
from fedsim.aggregator.snapshot import Snapshot
from fedsim.aggregator.strategies import Global, Refused, Strategy, Update
from fedsim.aggregator.tasks.secagg import SecaggQueue
from fedsim.aggregator.views import Clients
from fedsim.config import Settings

log = logging.getLogger("fedsim.aggregator")

Tensors = Mapping[str, np.ndarray]


class Core(Protocol):
    """What the intake uses of the state."""

    settings: Settings
    strategy: Strategy
    queue: tasks.Queue
    snapshot: Snapshot
    held: list[Update]
    ledger: Ledger
    evaluations: Evaluations
    clients: Clients
    events: Events
    metrics: Recorder
    saver: Saver
    stages: pipeline.Pipeline
    privacy: privacy.Privacy | None

    def stamp(self) -> str: ...
    def drain_expired(self) -> None: ...
    def base(self, version: int) -> Snapshot | None: ...
    def current(self) -> Global: ...
    def rule_step(
        self, step: Callable[[], Tensors | None], updates: list[Update]
    ) -> Tensors | None: ...
    def apply(self, tensors: Tensors, updates: list[Update], now: float) -> None: ...


def _metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def check_step(core: Core, tensors: Tensors | None, updates: list[Update]) -> Tensors | None:
    """The weights to publish: `tensors` (None: the rule holds the updates) through the
    pipeline's publish stages, which end with the finite check (every weight finite and
    |w| <= MAX_WEIGHT). Also refuse a step that leaves the rule's own state (momentum,
    moments, a buffer) non-finite: it would be saved, and every later version made from
    it. Nothing is published then."""
    who = ", ".join(f"{u.client_id} ({u.update_id})" for u in updates)
    if tensors is not None:
        try:
            tensors = core.stages.publish(tensors)
        except pipeline.Rejected as exc:
            log.error("refused aggregate: %s; updates: %s", exc.reason, who)
            raise Refused(
                "bad_aggregate",
                f"aggregating this update would make tensor {exc.tensor} non-finite or "
                f"larger than {pipeline.MAX_WEIGHT:g}; the model stays at version "
                f"{core.snapshot.version}",
            ) from None
    for name, tensor in core.strategy.tensor_state().items():
        if not np.isfinite(tensor).all():
            log.error("refused: the rule's %s would be non-finite; updates: %s", name, who)
            raise Refused(
                "bad_aggregate",
                f"this update would make the rule's {name} non-finite; nothing changed",
            )
    return tensors


# --- asynchronous rules ------------------------------------------------------------------


def seen(core: Core, update: Update, version: int) -> bool:
    """Whether `update` was received before (a retry: acknowledge, count once).

    A task's update is new while its task is open (the queue checks the lease,
    the client and the base version); one without a task while its id is
    neither in the ledger nor held. Raises Refused for an update not wanted.
    """
    if update.task_id is not None:
        if core.ledger.get(update.update_id) is not None:
            return True
        fresh = core.queue.check_update(
            update.task_id,
            update.lease,
            update.client_id,
            update.base_version,
            version,
            update.num_samples,
        )
        core.drain_expired()
        return not fresh
    if update.num_samples > core.settings.num_images_train:
        raise Refused(
            "bad_num_samples",
            f"num_samples={update.num_samples}: an update without a task is one "
            f"slice, at most NUM_IMAGES_TRAIN={core.settings.num_images_train}",
            status=422,
        )
    if core.queue.stopped is not None:  # no version after the stop, with a task or not
        raise Refused("finished", f"the run stopped: {core.queue.stopped}", finished=True)
    if core.strategy.mode != "async":
        raise Refused(
            "no_task",
            f"{core.strategy.name} runs rounds of sampled clients: only updates for "
            "tasks count; start a worker instead of a client with its own range",
        )
    return core.ledger.get(update.update_id) is not None or any(
        u.update_id == update.update_id for u in core.held
    )


def accept(
    core: Core,
    update: Update,
    version: int,
    now: float,
    base: Global | None = None,
    look: bool = True,
) -> None:
    """An asynchronous rule takes `update`: a new version, or the update held. The base
    model is `base`, else looked up when the rule wants one and `look` (a replay says)."""
    strategy = core.strategy
    started = time.perf_counter()
    if base is None and look and strategy.wants_base:
        base = _base_of(core, update.base_version)
    try:
        tensors = core.rule_step(
            lambda: strategy.accept(update, core.current(), base), [*core.held, update]
        )
    except Refused:
        if update.task_id is not None:
            # The task is spent: handing it out again would make the same update.
            core.queue.record_update(update.task_id, update.lease)
        raise
    core.saver.log_update(update, step=True, base=base)
    if update.task_id is not None:
        core.queue.record_update(update.task_id, update.lease)
        core.metrics.task_finished("train")
    if tensors is None:
        _hold(core, update, version, now)
    else:
        held, core.held = core.held, []
        core.apply(tensors, [*held, update], now)
        _log_accepted(core, update)
        _after_version(core)
    _flush_if_done(core, now)
    core.metrics.aggregation_seconds(time.perf_counter() - started)  # held or made a version


def model_of(core: Core, version: int) -> Tensors | None:
    """The weights of `version` (in memory, else its checkpoint), or None: what a compressed
    update is decoded onto (uploads.py). Reads no more than `_base_of`, outside the lock."""
    found = _base_of(core, version)
    return None if found is None else found.tensors


def _base_of(core: Core, version: int) -> Global | None:
    """The version an update was trained from: in memory, else its checkpoint file
    (after a restart), else None (the rule then measures from the current model)."""
    snap = core.base(version)
    if snap is not None:
        return Global(snap.tensors, snap.version, snap.samples)
    path = checkpoints.path_for(core.settings.model_dir, version)
    try:
        ckpt = checkpoints.read(path)
    except (OSError, weights.WeightsError):
        return None
    model = checkpoints.split(ckpt.tensors)[0]
    return Global(model, ckpt.version, int(ckpt.metadata.get("samples", "0")))


def _hold(core: Core, update: Update, version: int, now: float) -> None:
    """A buffering rule took `update` without making a version yet."""
    # Only what accounting needs is kept: the rule has folded the tensors in already.
    core.held.append(dataclasses.replace(update, tensors={}))
    core.saver.changed(now, held=True)
    core.clients.see(update, version - update.base_version, core.stamp())
    log.info(
        "accepted update from client %s (task %s): base v%d -> buffer (%d waiting), "
        "%d samples, loss %s, accuracy %s",
        update.client_id,
        update.task_id or update.update_id,
        update.base_version,
        core.strategy.pending,
        update.num_samples,
        _metric(update.meta.get("loss")),
        _metric(update.meta.get("accuracy")),
    )


def _flush_if_done(core: Core, now: float) -> None:
    """At the end of the run, apply what a buffering rule still holds."""
    if not (core.queue.training_done and core.held and core.strategy.pending):
        return
    try:
        tensors = core.rule_step(lambda: core.strategy.flush(core.current()), core.held)
    except Refused:
        log.error("the last %d buffered updates were refused: no new version", len(core.held))
        core.held = []
        return
    if tensors is None:
        return
    held, core.held = core.held, []
    core.apply(tensors, held, now)
    log.info("the last %d buffered updates -> v%d", len(held), core.snapshot.version)
    _after_version(core)


def _log_accepted(core: Core, update: Update) -> None:
    where = f" slice {update.meta['slice']}" if "slice" in update.meta else ""
    task = f" (task {update.task_id})" if update.task_id else ""
    log.info(
        "accepted update from client %s%s%s: base v%d -> v%d, %d samples, "
        "loss %s, accuracy %s, total %d samples",
        update.client_id,
        where,
        task,
        update.base_version,
        core.snapshot.version,
        update.num_samples,
        _metric(update.meta.get("loss")),
        _metric(update.meta.get("accuracy")),
        core.snapshot.samples,
    )


def _after_version(core: Core) -> None:
    """Queue the score a new version calls for: every EVAL_EVERY versions
    (version % EVAL_EVERY == 0), and the final model."""
    snap, done = core.snapshot, core.queue.training_done
    if snap.version % core.settings.evaluate_every == 0 or done:
        core.evaluations.want(snap, None, core.ledger.total)
    if done:
        log.info("all training tasks are done at version %d; scoring the final model", snap.version)


# --- round rules -------------------------------------------------------------------------


def add_to_round(core: Core, update: Update, version: int, now: float) -> None:
    """A round rule's update waits in its round, which closes when due."""
    queue = core.queue
    assert isinstance(queue, tasks.RoundQueue) and update.task_id is not None
    queue.add_update(update.task_id, update)  # at the run clock's now
    core.saver.log_update(update, step=False)
    queue.record_update(update.task_id, update.lease)
    core.metrics.task_finished("train")
    r = queue.round
    assert r is not None
    log.info(
        "accepted update from %s (task %s): base v%d -> round %d (%d/%d), "
        "%d samples, loss %s, accuracy %s",
        update.client_id,
        update.task_id,
        update.base_version,
        r.number,
        len(r.updates),
        len(r.sampled),
        update.num_samples,
        _metric(update.meta.get("loss")),
        _metric(update.meta.get("accuracy")),
    )
    core.clients.see(update, version - update.base_version, core.stamp())
    close_round_if_due(core, now)


def close_round_if_due(core: Core, now: float) -> None:
    """Close the open round when it is full or timed out: one version from its updates."""
    queue = core.queue
    if isinstance(queue, SecaggQueue):  # its phases, then its round (secure.py)
        secure.advance(core, now)
        return
    if not isinstance(queue, tasks.RoundQueue):
        return
    why = queue.due()  # on the run's clock
    if why == tasks.RETRY:
        retry_round(core, now)
    elif why is not None:
        close_round(core, now, why)


def retry_round(core: Core, now: float) -> None:
    """The open attempt reached its deadline short of the quorum: nothing is published, and
    the round is tried again with a new sample."""
    queue = core.queue
    assert isinstance(queue, tasks.RoundQueue)
    failed = queue.retry()
    core.saver.log_close(failed.number, attempt=failed.attempt, retry=True)
    core.saver.changed(now, held=True)  # a checkpoint keeps the new attempt and its sample
    r = queue.round
    assert r is not None
    text = (
        f"round {failed.number} attempt {failed.attempt}: {len(failed.updates)} of the "
        f"{queue.quorum} updates it needs by its deadline; attempt {r.attempt} asks "
        f"{', '.join(f'client-{n}' for n in r.sampled)}"
    )
    log.warning("%s", text)
    core.events.add("round", text)


def close_round(core: Core, now: float, why: str) -> None:
    """Close the open round (it has an update): one version from its updates, or none when
    the rule refuses them."""
    queue = core.queue
    assert isinstance(queue, tasks.RoundQueue)
    r = queue.close(why)
    core.saver.log_close(r.number, attempt=r.attempt)
    updates = [r.updates[n] for n in r.sampled if n in r.updates]
    started = time.perf_counter()
    try:
        # The pipeline's gather sides see the round's updates with its model first (the clip
        # re-check, DP's noised mean: pipeline/dp.py), then the rule. On a refusal the
        # stages' state (adaptive clipping's norm) is put back, as rule_step does the rule's.
        with core.stages.kept_on_error():
            batch = core.stages.gather(
                [u.tensors for u in updates], core.current().tensors, r.number
            )
            gathered = [
                dataclasses.replace(u, tensors=t) for u, t in zip(updates, batch, strict=True)
            ]
            tensors = core.rule_step(
                lambda: core.strategy.aggregate(core.current(), gathered), updates
            )
    except (Refused, pipeline.Rejected) as exc:  # no version: the server optimizer stays
        log.error("round %d produced no new version: %s", r.number, exc.reason)
        core.events.add("round", f"round {r.number} refused: {exc.reason}")
        core.metrics.set_round(min(queue.rounds_done + 1, queue.rounds))
        # The round counts in epsilon all the same (aggregator/privacy.py): its noised mean
        # was drawn, and the refusal, which is public, depends on it.
        privacy.after_round(core, r.number)
        return
    assert tensors is not None
    core.apply(tensors, updates, now)
    snap = core.snapshot
    log.info(
        "round %d closed (%s%s): %d of %d sampled clients, %d samples -> v%d, total %d samples%s",
        r.number,
        why,
        f", attempt {r.attempt}" if r.attempt > 1 else "",
        len(updates),
        len(r.sampled),
        sum(u.num_samples for u in updates),
        snap.version,
        snap.samples,
        "; all rounds done" if queue.training_done else "",
    )
    core.events.add(
        "round",
        f"round {r.number} closed ({why}{f', attempt {r.attempt}' if r.attempt > 1 else ''}): "
        f"{len(updates)}/{len(r.sampled)} clients -> v{snap.version}",
    )
    core.metrics.set_round(min(queue.rounds_done + 1, queue.rounds))
    privacy.after_round(core, r.number)
    core.evaluations.want(snap, r.number, core.ledger.total)
    core.metrics.aggregation_seconds(time.perf_counter() - started)  # ε's accounting included
