"""At start, the journal's records that the checkpoint resumed from does not hold, taken again.

The checkpoint's `journal_seq` says which records it holds; the later ones are
replayed in order through the same intake as live updates, so the state ends
as it was when the last of them was acknowledged, each update in it once:

- an asynchronous rule's update is accepted again, on the version the replay
  has reached (the versions since the checkpoint are made again the same way),
  against the same base model: the one logged with it when it was older than
  the newest checkpoint, else the version in memory or on disk, as before;
- a round rule's update goes back into its round, which closes when it is full
  at its first arrivals as before; a `close` record closes a round at its deadline, or
  ends an attempt that is tried again (`retry`).

Records of a round the state is not at (a gap after a lost checkpoint) are
skipped with a log line. Without DURABLE a journal left by a run that had it is
replayed too; then the replayed state is checkpointed at once, the journal
removed, and nothing journaled from then on (`Saver.settle`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Any

from fedsim.aggregator import intake, journal, tasks, virtual_async
from fedsim.aggregator.persistence import Start
from fedsim.aggregator.saving import BASE, COVERED
from fedsim.aggregator.strategies import Global, Refused, Update
from fedsim.aggregator.tasks import ids
from fedsim.aggregator.tasks.clock import VirtualClock
from fedsim.aggregator.virtual_async import Flights

log = logging.getLogger("fedsim.aggregator")

_UPDATE_FIELDS = frozenset(f.name for f in dataclasses.fields(Update))


def resume(core: Any, start: Start, now: float) -> None:
    """Open the journal (DURABLE=true, or one left behind) and replay what the checkpoint
    lacks. `core` is the state, just built (the caller holds its lock); `now` its clock."""
    settings, saver = core.settings, core.saver
    path = settings.model_dir / journal.FILE
    try:
        covered = max(0, int(start.checkpoint.metadata.get(COVERED, "0")))
    except ValueError:
        covered = 0
    saver.covered = covered
    if not settings.durable and not path.exists():
        return
    jr = journal.Journal(path, last_seq=covered)
    records = [r for r in jr.records if r.seq > covered]
    jr.records = []  # their tensors are not kept beyond the replay
    if not records and not settings.durable:
        jr.close()
        path.unlink()
        log.info("journal %s: every record is in the checkpoint; removed", path)
        return
    first = records[0].seq if records else None
    if first is not None and first > covered + 1:
        log.warning(
            "journal %s starts at record %d but the checkpoint holds records up to %d: "
            "the updates between were in a newer checkpoint that did not read back",
            path,
            first,
            covered,
        )
    saver.journal, saver.replaying = jr, True
    done: Counter[str] = Counter()
    try:
        for record in records:
            done[_replay(core, record, now)] += 1
            if record.step:
                jr.step = record.seq
    finally:
        saver.replaying = False
    if records:
        log.info(
            "journal %s: %d records after the checkpoint's %d replayed (%s): version %d, "
            "%d updates",
            path,
            len(records),
            covered,
            ", ".join(f"{n} {what}" for what, n in sorted(done.items())),
            core.snapshot.version,
            core.ledger.total,
        )
        core.events.add(
            "restart", f"replayed {len(records)} journal records -> v{core.snapshot.version}"
        )
    if not settings.durable:
        saver.settle()


def _replay(core: Any, record: journal.Record, now: float) -> str:
    """Take one record again; what became of it, for the log."""
    queue = core.queue
    if record.kind == "close":
        r = queue.round if isinstance(queue, tasks.RoundQueue) else None
        attempt = record.fields.get("attempt", 1)
        if r is None or (r.number, r.attempt) != (record.fields.get("round"), attempt):
            return "closes already made"
        if record.fields.get("retry"):
            intake.retry_round(core, now)
            return "rounds retried"
        if not r.updates:
            return "closes already made"
        intake.close_round(core, now, "deadline")
        return "rounds closed"
    update, base, look = _update(record)
    version = core.snapshot.version
    try:
        if core.strategy.mode == "async":
            at = record.fields.get("at")

            def take() -> None:
                intake.accept(core, update, core.snapshot.version, now, base=base, look=look)

            if isinstance(core.sim, Flights) and isinstance(at, int | float):
                # CLOCK=virtual: taken in its flight's place, at its simulated time.
                done = virtual_async.replay(core, core.sim, update, at, take)
                return "updates" if done else "skipped"
            take()
            return "updates"
        assert isinstance(queue, tasks.RoundQueue) and update.task_id is not None
        r = queue.open_round(version)
        parsed = ids.parse_attempt(update.task_id)
        if (
            r is None
            or parsed is None
            or parsed[:2] != (r.number, r.attempt)
            or (parsed[2] in r.updates)
        ):
            log.warning("journal: update %s for task %s is not of the open round: skipped",
                        update.update_id, update.task_id)  # fmt: skip
            return "skipped"
        at, opened = record.fields.get("at"), record.fields.get("opened_at")
        if isinstance(queue.run_clock, VirtualClock) and isinstance(at, int | float):
            queue.run_clock.now = float(at)  # taken at its simulated time, as before
            if r.opened_at is None and isinstance(opened, int | float):
                r.opened_at = float(opened)
        intake.add_to_round(core, update, version, now)
        return "updates"
    except Refused as exc:
        log.warning("journal: update %s refused on replay: %s", update.update_id, exc.reason)
        return "refused"


def _update(record: journal.Record) -> tuple[Update, Global | None, bool]:
    """The update of a record, the base model logged with it, and whether to look one up."""
    fields = {k: v for k, v in record.fields.items() if k in _UPDATE_FIELDS}
    tensors = {k: v for k, v in record.tensors.items() if not k.startswith(BASE)}
    update = Update(**{**fields, "tensors": tensors})
    base_tensors = {
        k.removeprefix(BASE): v for k, v in record.tensors.items() if k.startswith(BASE)
    }
    used = bool(record.fields.get("base_used"))
    if base_tensors:
        samples = int(record.fields.get("base_samples", 0))
        return update, Global(base_tensors, update.base_version, samples), False
    return update, None, used
