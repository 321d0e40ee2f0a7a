"""SECAGG=true on the aggregator: phase reports and masked inputs into the open attempt,
phases closed on time, and an unmasked round made into one version.

The queue (tasks/secagg.py) runs the attempt; this module is what the state does
around it: refusals as 4xx (`Refused`), one log line per step (round, phase, client,
worker; never a value of an update), events and metrics, and the round's close. The
unmasked weighted mean goes to the rule as DP's does (pipeline/dp.py): every survivor's
update is w_t + mean, so whatever averaging rule runs (fedavg, fedprox and the server
optimizers) steps on the mean, and the ledger credits each survivor. The round goes
through the pipeline's gather sides as a plain round does: under DP (weights of 1, so
an equal-weight mean of the workers' clipped deltas) that adds the central noise of std
z * DP_CLIP / m to the mean, and the round counts in epsilon. Nothing of a
single update is logged, journaled or saved. The caller holds the state's lock.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedsim import pipeline
from fedsim.aggregator import privacy
from fedsim.aggregator.strategies import Refused, Update
from fedsim.aggregator.tasks.secagg import SecaggQueue
from fedsim.pipeline.secagg import server
from fedsim.pipeline.secagg.vectors import flat, unflat
from fedsim.protocol import SecaggReport, client_id

log = logging.getLogger("fedsim.aggregator")


def queue_of(core: Any) -> SecaggQueue:
    queue = core.queue
    if not isinstance(queue, SecaggQueue):
        raise Refused("not_secagg", "this run does not use secure aggregation (SECAGG=false)")
    return queue


def report(core: Any, msg: SecaggReport, size: int, now: float) -> dict[str, Any]:
    """A worker's phase message for its task's client. Raises Refused; nothing changes then."""
    queue = queue_of(core)
    advance(core, now)  # a phase that timed out closes before a late message counts
    n = queue.check_phase(msg.task, msg.lease, msg.nonce, msg.phase)
    a = queue.attempt
    assert a is not None
    try:
        if msg.phase == "keys":
            fresh = a.add_keys(n, *msg.public_keys())
        elif msg.phase == "shares":
            fresh = a.add_shares(n, msg.blobs())
        else:
            fresh = a.add_unmask(n, msg.blobs())
    except server.Malformed as exc:
        raise Refused("bad_report", str(exc), status=422) from None
    queue.done(msg.task, msg.lease)
    who = queue.workers[msg.worker].name if msg.worker in queue.workers else "a worker"
    if fresh and queue.stats is not None:
        queue.stats.bytes += size
    log.info(
        "round %d attempt %d: %s %s from %s (%d/%d)%s",
        a.round_no,
        queue.stats.attempts if queue.stats else 0,
        msg.phase,
        client_id(n),
        who,
        len(a.received()),
        len(a.expected()),
        "" if fresh else " again, counted once",
    )
    advance(core, now)
    return {"recorded": True, "duplicate": not fresh}


def masked(
    core: Any, task: str, lease: str, nonce: str, client: str, worker: str,
    tensors: Mapping[str, np.ndarray], size: int, now: float,
) -> dict[str, Any]:  # fmt: skip
    """A masked input (uint64 tensors of the model's layout, already checked). Raises Refused."""
    queue = queue_of(core)
    advance(core, now)
    n = queue.check_masked(task, lease, nonce, client)
    a = queue.attempt
    assert a is not None
    try:
        fresh = a.add_masked(n, flat(tensors))
    except server.Malformed as exc:
        raise Refused("bad_masked_input", str(exc), status=422) from None
    queue.done(task, lease)
    if fresh:
        core.metrics.task_finished("train")
        if queue.stats is not None:
            queue.stats.bytes += size
    log.info(
        "round %d: masked input of %s (task %s) from %s in, %d/%d%s",
        a.round_no,
        client,
        task,
        queue.workers[worker].name if worker in queue.workers else "a worker",
        len(a.masked),
        len(a.u2),
        "" if fresh else " (again, counted once)",
    )
    advance(core, now)
    return {"accepted": True, "duplicate": not fresh, "version": core.snapshot.version}


def advance(core: Any, now: float) -> None:
    """Close what is due: phases complete or timed out, an attempt abandoned, a round
    unmasked (then one version)."""
    queue = queue_of(core)
    for _ in range(5):  # each call closes at most one phase
        what = queue.advance(now)
        for reason in queue.abandoned:
            log.warning("secure aggregation attempt abandoned: %s; new sample and nonce", reason)
            core.events.add("round", f"secure aggregation attempt abandoned: {reason}")
        queue.abandoned.clear()
        if what is None or what == "abandoned":
            return
        a = queue.attempt
        if what == "unmasked":
            close_round(core, now)
            return
        assert a is not None
        log.info(
            "round %d: %s; %d of %d clients in, phase %s open",
            a.round_no,
            what,
            len(getattr(a, {"shares": "u1", "masked": "u2", "unmask": "u3"}[a.phase])),
            len(a.sampled),
            a.phase,
        )


def close_round(core: Any, now: float) -> None:
    """The unmasked mean -> each survivor's w_t + mean -> the rule -> a version, or none when
    the aggregate is refused (finite and bounded, as every aggregate)."""
    queue = queue_of(core)
    out = queue.take_outcome()
    started = time.perf_counter()
    base = core.current().tensors
    mean = unflat(out.mean, base)
    model = {name: (np.asarray(base[name], np.float64) + mean[name]).astype(np.float32)
             for name in base}  # fmt: skip
    updates = [
        Update(client_id(n), f"r{out.round.number}.c{n}", out.round.base_version,
               out.weights[n], model, {"secagg": "true"}, f"r{out.round.number}.c{n}")
        for n in out.survivors
    ]  # fmt: skip
    stats = out.stats
    seconds = max(0.0, now - stats.started)  # the state's clock, the queue's too
    try:  # the gather sides (DP's central noise on the mean), then the rule
        with core.stages.kept_on_error():
            batch = core.stages.gather([u.tensors for u in updates], base, out.round.number)
            gathered = [
                dataclasses.replace(u, tensors=t) for u, t in zip(updates, batch, strict=True)
            ]
            tensors = core.rule_step(
                lambda: core.strategy.aggregate(core.current(), gathered), updates
            )
    except (Refused, pipeline.Rejected) as exc:
        log.error("round %d produced no new version: %s", out.round.number, exc.reason)
        core.events.add("round", f"round {out.round.number} refused: {exc.reason}")
        core.metrics.set_round(min(queue.rounds_done + 1, queue.rounds))
        privacy.after_round(core, out.round.number)  # its noised mean was drawn: it counts
        return
    assert tensors is not None
    core.apply(tensors, updates, now)
    core.metrics.secagg_round(stats.masked_in, stats.recovered, stats.bytes, seconds)
    for u in updates:  # the dashboard's row: the round was secure, nothing of the update
        core.clients.see(u, 0, core.stamp())
    snap = core.snapshot
    log.info(
        "round %d closed (secure aggregation, attempt %d): %d of %d clients masked in, "
        "%d dropouts recovered, %d protocol bytes, %.1fs -> v%d",
        out.round.number,
        stats.attempts,
        stats.masked_in,
        len(out.round.sampled),
        stats.recovered,
        stats.bytes,
        seconds,
        snap.version,
    )
    core.events.add(
        "round",
        f"round {out.round.number} closed (secure): {stats.masked_in}/"
        f"{len(out.round.sampled)} clients -> v{snap.version}",
    )
    queue.history.append(
        {"round": out.round.number, "version": snap.version, "attempts": stats.attempts,
         "masked_in": stats.masked_in, "recovered": stats.recovered,
         "protocol_bytes": stats.bytes, "protocol_seconds": round(seconds, 3),
         "unmask_seconds": round(stats.unmask_seconds, 4)}
    )  # fmt: skip
    core.metrics.set_round(min(queue.rounds_done + 1, queue.rounds))
    privacy.after_round(core, out.round.number)
    core.evaluations.want(snap, out.round.number, core.ledger.total)
    # The round's own work: its unmasking (in the queue), then the steps to its version.
    core.metrics.aggregation_seconds(stats.unmask_seconds + time.perf_counter() - started)
