"""Tasks a worker gives back (`POST /v1/dropouts`): its client dropped out, or its training
diverged.

A dropped task goes to the next worker that asks (DROPOUT_MODE=abort). A diverged
training (non-finite weights) would diverge again on any worker, so the run stops
at the served version: the open round is dropped unpublished, every lease is
revoked and no update counts after (`Queue.stop`); the version is scored if it
was not. The caller holds the state's lock.
"""

from __future__ import annotations

import logging

from fedsim.aggregator.intake import Core

log = logging.getLogger("fedsim.aggregator")

STOPPED = "run stopped, a training diverged: "  # the log line's start (experiment/outcome.py)


def give_back(state: Core, task_id: str, lease: str) -> int:
    """The attempt of `task_id` that dropped; the task goes back to the queue. Refused if
    the task is not held under `lease`."""
    worker, client, attempt = state.queue.give_back(task_id, lease)
    state.drain_expired()
    state.clients.dropped(client)
    log.info("task %s (%s) given back by %s: its client dropped out", task_id, client, worker)
    state.events.add("dropout", f"{client} dropped task {task_id} on {worker}")
    return attempt


def stop(state: Core, task_id: str, lease: str, detail: str) -> str:
    """Stop the run for `task_id`'s diverged training (`detail`: what was non-finite); the
    one-line reason. Refused if the task is not held under `lease`."""
    worker, client, _ = state.queue.give_back(task_id, lease)
    version = state.snapshot.version
    reason = (
        f"{client}'s training in task {task_id} on {worker} diverged ({detail}); "
        f"the run stops at version {version}: lower LEARNING_RATE"
        + (", or DP_NOISE" if state.privacy is not None else "")
    )
    state.queue.stop(reason)
    log.error("%s%s", STOPPED, reason)
    state.events.add("finished", f"stopped: {reason}")
    # Asynchronous rules score every EVAL_EVERY versions: the last one may have none.
    evaluations = state.evaluations
    if not (evaluations.scored(version) or version in evaluations.waiting):
        evaluations.want(state.snapshot, None, state.ledger.total)
    if state.queue.finished:
        state.metrics.set_finished(True)
    return reason
