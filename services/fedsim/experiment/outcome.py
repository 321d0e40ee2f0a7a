"""What one run measured, from what it left: its history, its logs, its metrics, its memory.

Both engines hand over the same `Raw` record; `measure` turns it into the
figures of a row of runs.csv and the run's curve (one point per evaluated
version). A point's `x` is its round, or under an asynchronous rule the
updates aggregated so far divided by the clients of a round, so every rule is
read on the same axis.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Any

STATUSES = ("finished", "target", "timeout")  # ran to its end, stopped at the target, timed out
# A worker's line for a trained task: "... train samples 600 loss 0.31 acc 0.91 (1.2s)".
TRAIN_LINE = re.compile(r" train samples \d+ loss \S+ acc \S+ \((\d+(?:\.\d+)?)s\)")
# A worker's last line: "... worker-1 done: 4 updates trained ..., 0 retries, 31.2s".
WORKER_DONE = re.compile(r" done: \d+ updates trained.*, (\d+(?:\.\d+)?)s$", re.M)
REFUSED_LINE = "refused aggregate:"  # the aggregator's line for a non-finite or exploding model
STOPPED_LINE = "run stopped, a training diverged: "  # aggregator/dropouts.py's STOPPED
AGGREGATOR_PEAK = "fedsim_process_peak_resident_memory_bytes"  # its VmHWM, in its /metrics
GROWTH_FROM_ROUND = 5  # memory growth is read from this round (TensorFlow has warmed up) on
# ... between the medians of this many readings at each end: a process's memory swings
# with what a round holds when it is read (the aggregator's buffered updates, ±30 MiB
# on W2's cnn), and one reading at each end read a swing as growth.
GROWTH_WINDOW = 5


@dataclass
class Raw:
    """What an engine collected during a run."""

    status: str
    started: float  # wall clock (time.time()) when the run started
    seconds: float  # from the start to the end of training (the workers done, or stopped)
    entries: list[dict[str, Any]]  # the history, oldest version first
    # version -> bytes of each process (or container) when the version arrived
    memory_at: dict[int, dict[str, int]] = field(default_factory=dict)
    peak_memory: int = 0
    worker_logs: str = ""
    aggregator_log: str = ""
    metrics: str = ""  # the aggregator's /metrics text at the end
    status_bytes: int | None = None  # the last /v1/status answer the watcher read
    history_bytes: int | None = None  # the last /v1/history page the watcher read
    load_start: float = 0.0
    load_end: float = 0.0


@dataclass
class Point:
    x: float
    round: int | None
    version: int
    accuracy: float
    loss: float
    seconds: float | None  # since the run's start
    memory: int | None  # the run's processes together
    sim_seconds: float | None = None  # CLOCK=virtual: the simulated time of the version
    memory_by_process: dict[str, int] | None = None  # "aggregator", "worker-1", ...: bytes


def value(text: str, name: str) -> float | None:
    """A sample's value in Prometheus' text format; None when it is absent."""
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)
    return None if match is None else float(match.group(1))


def metric(text: str, name: str) -> int | None:
    """A counter's value, rounded to a whole number; None when it is absent."""
    found = value(text, name)
    return None if found is None else round(found)


def aggregator_seconds_per_round(text: str, rounds: float) -> float | None:
    """The aggregator's own wall time per round: the time it spent making versions (closing
    rounds: the pipeline's stages such as DP's clipping and noise, secure aggregation's
    unmasking, the rule, publishing, ε's accounting; or taking updates, under an
    asynchronous rule) and writing checkpoints, over the run, divided by its rounds.
    From /metrics: fedsim_aggregation_seconds_sum + fedsim_checkpoint_seconds_sum.
    None without those (an older aggregator, no metrics) or without a round."""
    making = value(text, "fedsim_aggregation_seconds_sum")
    saving = value(text, "fedsim_checkpoint_seconds_sum")
    if making is None or saving is None or rounds <= 0:
        return None
    return round((making + saving) / rounds, 6)


def stamp(entry: Mapping[str, Any]) -> float | None:
    try:
        return datetime.fromisoformat(str(entry["time"])).timestamp()
    except (KeyError, ValueError):
        return None


def curve(raw: Raw, per_round: int) -> list[Point]:
    points = []
    for e in raw.entries:
        rnd = e.get("round")
        x = float(rnd) if isinstance(rnd, int) else (e.get("updates") or 0) / per_round
        at = stamp(e)
        parts = raw.memory_at.get(int(e["version"]))
        points.append(
            Point(
                round(x, 4),
                rnd if isinstance(rnd, int) else None,
                int(e["version"]),
                float(e["accuracy"]),
                float(e["loss"]),
                None if at is None else round(max(0.0, at - raw.started), 2),
                sum(parts.values()) if parts else None,
                _number(e.get("sim_seconds")),
                parts or None,
            )
        )
    return points


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok else None


def _per_round(points: Sequence[Point]) -> float | None:
    """Mean seconds between evaluations from round 1 on (TensorFlow's start-up left out)."""
    timed = [p for p in points if p.x >= 1 and p.seconds is not None]
    if len(timed) < 2 or timed[-1].x == timed[0].x:
        return None
    return round((timed[-1].seconds - timed[0].seconds) / (timed[-1].x - timed[0].x), 3)


def _ends(readings: Sequence[Any]) -> tuple[Sequence[Any], Sequence[Any]] | None:
    """The first and the last GROWTH_WINDOW of `readings` (half of them each when there
    are fewer than twice as many); None with fewer than two."""
    if len(readings) < 2:
        return None
    k = min(GROWTH_WINDOW, len(readings) // 2)
    return readings[:k], readings[-k:]


def median_growth(readings: Sequence[int]) -> int | None:
    """The median of the last readings less that of the first (`_ends`): the growth of
    one series read a round apart, a swing at either end not read as growth."""
    ends = _ends(readings)
    if ends is None:
        return None
    return round(statistics.median(ends[1]) - statistics.median(ends[0]))


def _read(points: Sequence[Point]) -> list[Point]:
    """The points memory growth is read over: from round GROWTH_FROM_ROUND, with memory."""
    return [p for p in points if p.x >= GROWTH_FROM_ROUND and p.memory]


def _growth(points: Sequence[Point], by_process: Mapping[str, int] | None) -> int | None:
    """Memory at the run's end less memory from round GROWTH_FROM_ROUND, each the median
    of up to GROWTH_WINDOW readings (`median_growth`): the sum of the growth by process
    (`_growth_by_process`) when the processes were read apart, else the totals' change."""
    if by_process is not None:
        return sum(by_process.values())
    return median_growth([p.memory for p in _read(points)])


def _growth_by_process(points: Sequence[Point]) -> dict[str, int] | None:
    """The same growth for each process (or container), so a run's growth has a name:
    {"aggregator": bytes, "worker-1": bytes, ...}. A process is read at the end if it is
    in the last reading (a worker that had exited is not counted as shrinking), each
    end's median over the readings that have it (a container one `docker stats` missed
    keeps its place)."""
    ends = _ends(_read(points))
    if ends is None or not ends[1][-1].memory_by_process:
        return None
    first, last = ends

    def readings(end: Sequence[Point], name: str) -> list[int]:
        return [p.memory_by_process[name] for p in end if name in (p.memory_by_process or {})]

    out = {}
    for name in last[-1].memory_by_process:
        before, after = readings(first, name), readings(last, name)
        if before:
            out[name] = round(statistics.median(after) - statistics.median(before))
    return out or None


def growth(points: Sequence[Point]) -> dict[str, Any]:
    """A run's memory_growth_bytes and memory_growth_by_process, from its curve."""
    by_process = _growth_by_process(points)
    return {"memory_growth_bytes": _growth(points, by_process),
            "memory_growth_by_process": by_process}  # fmt: skip


def _scored(points: Sequence[Point]) -> list[Point]:
    """The evaluations a run is read on: version 0 (the initial model) left out, unless it
    is all there is."""
    return [p for p in points if p.version > 0] or list(points)


def crossing(points: Sequence[Point], target: float) -> float | None:
    """Where the best accuracy so far first reaches `target`, interpolated linearly
    between the evaluation before and the one that reached it: McMahan et al. (2017)
    count rounds to a target this way (their Tables 1 and 2): best so far 98.99% at
    round 19, 99.02% at round 20, crossed at 19 + (0.99 - 0.9899) / (0.9902 - 0.9899)
    = 19.33. None when it never did; the first evaluation's round when it already had."""
    best: Point | None = None  # the evaluation holding the best accuracy so far
    last_x = 0.0  # the round of the evaluation before
    for p in points:
        if p.accuracy >= target:
            if best is None:
                return p.x
            share = (target - best.accuracy) / (p.accuracy - best.accuracy)
            return round(last_x + share * (p.x - last_x), 2)
        if best is None or p.accuracy > best.accuracy:
            best = p
        last_x = p.x
    return None


def reread(curve: Sequence[Mapping[str, Any]], target: float | None) -> dict[str, Any]:
    """What a curve as result.json keeps it gives again, so runs measured before a
    figure was read (or read so) are shown alike: `growth` when it holds memory readings,
    `crossing` as rounds_to_target_interpolated when it reached `target`; nothing from a
    curve this version cannot read."""
    names = {f.name for f in fields(Point)}
    try:
        points = [Point(**{k: v for k, v in p.items() if k in names}) for p in curve]
    except (AttributeError, TypeError, ValueError):
        return {}
    out = growth(points) if any(p.memory for p in points) else {}
    crossed = None if target is None else crossing(_scored(points), target)
    return out | ({} if crossed is None else {"rounds_to_target_interpolated": crossed})


def _stopped(log: str) -> str | None:
    """Why the run stopped before its rounds (a client's training diverged), from the
    aggregator's log; None when it did not."""
    for line in log.splitlines():
        if STOPPED_LINE in line:
            return line.split(STOPPED_LINE, 1)[1].strip()
    return None


def _epsilon(entries: Sequence[Mapping[str, Any]]) -> float | None:
    """The ε of a DP run's last history entry (entries carry `delta` under DP), inf where it
    shows none (DP_NOISE=0: no bound; version 0's ε of 0 is not the run's); None without DP."""
    private = [e for e in entries if e.get("delta") is not None]
    if not private:
        return None
    last = private[-1].get("epsilon")
    return math.inf if last is None else float(last)


def measure(
    raw: Raw, *, per_round: int, workers: int, target: float | None, also: Sequence[float] = ()
) -> dict[str, Any]:
    """The figures of a run: a row of runs.csv (less the settings) and its curve; `also`:
    further targets, each with its rounds and seconds to it."""
    points = curve(raw, per_round)
    scored = _scored(points)
    final = scored[-1] if scored else None
    best = max(scored, key=lambda p: (p.accuracy, -p.version)) if scored else None
    reached = None
    if target is not None:
        reached = next((p for p in scored if p.accuracy >= target), None)
    further = []
    for t in also:
        hit = next((p for p in scored if p.accuracy >= t), None)
        further.append(
            {"target": t, "rounds": None if hit is None else hit.x,
             "seconds": None if hit is None else hit.seconds,
             "sim_seconds": None if hit is None else hit.sim_seconds}
        )  # fmt: skip
    train = sum(float(s) for s in TRAIN_LINE.findall(raw.worker_logs))
    worker_seconds_each = [float(s) for s in WORKER_DONE.findall(raw.worker_logs)]
    worker_seconds = workers * raw.seconds
    rounds = final.x if final else 0
    return {
        "status": raw.status,
        "rounds": rounds,
        "evaluations": len(scored),
        "final_accuracy": final.accuracy if final else None,
        "final_loss": final.loss if final else None,
        "best_accuracy": best.accuracy if best else None,
        "best_round": best.x if best else None,
        "target": target,
        "rounds_to_target": reached.x if reached else None,
        # The same as the FedAvg paper reads it: `crossing`, between two evaluations
        "rounds_to_target_interpolated": None if target is None else crossing(scored, target),
        "seconds_to_target": reached.seconds if reached else None,
        # CLOCK=virtual: simulated seconds to the target, the time a real deployment would take
        "sim_seconds_to_target": reached.sim_seconds if reached else None,
        "also": further,
        "seconds": round(raw.seconds, 2),
        "seconds_per_round": _per_round(points),
        "train_seconds": round(train, 2),
        "slowest_worker_seconds": max(worker_seconds_each, default=None),
        "outside_training": round(1 - train / worker_seconds, 4) if worker_seconds > 0 else None,
        "bytes_to_workers": metric(raw.metrics, "fedsim_sent_bytes_total"),
        "bytes_from_workers": metric(raw.metrics, "fedsim_received_bytes_total"),
        "peak_memory_bytes": raw.peak_memory or None,
        "aggregator_seconds_per_round": aggregator_seconds_per_round(raw.metrics, rounds),
        # The aggregator's process alone (VmHWM, from its /metrics), the workers' left out.
        "aggregator_peak_memory_bytes": metric(raw.metrics, AGGREGATOR_PEAK) or None,
        "status_bytes": raw.status_bytes,
        "history_bytes": raw.history_bytes,
        **growth(points),
        "refused_aggregates": raw.aggregator_log.count(REFUSED_LINE),
        "stopped": _stopped(raw.aggregator_log),
        "epsilon": _epsilon(raw.entries),
        "load_start": raw.load_start,
        "load_end": raw.load_end,
        "curve": [asdict(p) for p in points],
    }
