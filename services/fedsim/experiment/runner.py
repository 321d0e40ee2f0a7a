"""The sweep: every cell with every seed, one run after another, and the report at the end.

Runs never share the machine: each has the cores to itself, so their times
compare. Everything lands in `results/<name>/`:

    experiment.toml                     the file the sweep ran, as it was
    runs/<cell>/seed-<n>/result.json    a finished run's figures and curve
    runs/<cell>/seed-<n>/settings.json  every setting the run had, resolved
    runs/<cell>/seed-<n>/history.jsonl  its test accuracy and loss per version
    runs/<cell>/seed-<n>/logs/          each process's output
    runs.csv, summary.md, curves.png    the report (report.py)

A run is finished when its result.json exists: a sweep started again keeps and
skips those, and runs a half-done run (a folder without one) again from the
start. A cell's folder is named after its values and a digest of its settings,
workers, engine and stop, so a changed file never mistakes an old run for one
of its own.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import fedsim
from fedsim.experiment import report
from fedsim.experiment.outcome import Raw, measure
from fedsim.experiment.progress import Progress
from fedsim.experiment.spec import Cell, Experiment, expected_rounds, resolve
from fedsim.experiment.watch import Job, RunFailed

LABEL_LENGTH = 200  # RUN_LABEL's limit
RESULT = "result.json"
SWEEP = "sweep.json"  # the engine the sweep ran on, for --report
# Settings the runner gives each run itself: not worth keeping in settings.json.
RUNNER_KEYS = ("MODEL_DIR", "TOKENS_FILE", "AGGREGATOR_URL")


class Engine(Protocol):
    name: str

    def prepare(self) -> None: ...

    def run(self, job: Job, on_entry: Callable[[dict[str, Any]], None]) -> Raw: ...


@dataclass(frozen=True)
class Planned:
    cell: Cell
    seed: int
    job: Job

    @property
    def result(self) -> Path:
        return self.job.folder / RESULT


def write_json(path: Path, data: Any) -> None:
    """Atomically: a reader sees the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def label(e: Experiment, cell: Cell, seed: int) -> str:
    text = (
        f"{e.name}: cell {cell.number}/{len(e.cells)} {cell.title}, "
        f"seed {seed} ({e.seeds.index(seed) + 1}/{len(e.seeds)})"
    )
    return text if len(text) <= LABEL_LENGTH else text[: LABEL_LENGTH - 3] + "..."


def plan(e: Experiment, folder: Path) -> list[Planned]:
    """Every run of the sweep, cell by cell, each seed in the file's order."""
    out = []
    for cell in e.cells:
        key = cell.key(e.engine_of(cell), e.stop, e.target)
        for seed in e.seeds:
            settings = resolve(cell, seed)
            job = Job(
                settings={**cell.settings, "SEED": str(seed)},
                seed=seed,
                workers=cell.workers,
                label=label(e, cell, seed),
                folder=folder / "runs" / key / f"seed-{seed}",
                per_round=settings.per_round,
                expected_rounds=expected_rounds(settings),
                target=e.target,
                stop=e.stop,
                timeout=e.timeout,
            )
            out.append(Planned(cell, seed, job))
    return out


def finished(p: Planned) -> dict[str, Any] | None:
    """The result of a finished run; None when it has none (not run, or cut short)."""
    try:
        return json.loads(p.result.read_text())
    except (OSError, ValueError):
        return None


def outcome_line(result: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.2%}"

    parts = [
        f"final {pct(result['final_accuracy'])}, best {pct(result['best_accuracy'])}",
        f"{result['rounds']:g} rounds in {result['seconds']:.0f} s",
    ]
    if result["target"] is not None:
        reached = result["rounds_to_target"]
        crossed = result.get("rounds_to_target_interpolated")
        parts.append(
            f"{result['target']:.0%} "
            + ("not reached" if reached is None else f"at round {reached:g}")
            + ("" if reached is None or crossed is None else f" ({crossed:g} interpolated)")
        )
    parts.append(f"load {result['load_start']:.2f}-{result['load_end']:.2f}")
    if result["status"] != "finished":
        parts.append(f"stopped: {result['status']}")
    if result.get("stopped"):
        parts.append(f"stopped early: {result['stopped']}")
    return "; ".join(parts)


def machine() -> dict[str, Any]:
    """fedsim's version and the machine's cores and memory, as a run records them."""
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration, ValueError):
        kib = 0
    return {"fedsim": fedsim.__version__, "cpus": os.cpu_count(), "memory_bytes": kib * 1024}


@dataclass(frozen=True)
class Started:
    """The 1-minute load when this sweep started, and whether it was forced above the limit:
    each run's row carries both, so a resumed sweep's runs say which start they had."""

    load: float
    loaded: bool = False


def run_one(
    e: Experiment, engine: Engine, p: Planned, progress: Progress, started: Started | None = None
) -> dict[str, Any]:
    if p.job.folder.exists():
        shutil.rmtree(p.job.folder)  # a run cut short: again from the start
    p.job.folder.mkdir(parents=True)
    resolved = resolve(p.cell, p.seed).to_dict()
    resolved["RUN_LABEL"] = p.job.label
    for key in RUNNER_KEYS:
        resolved.pop(key, None)
    write_json(p.job.folder / "settings.json", resolved)
    progress.begin(p.job.label, p.job.expected_rounds)

    def on_entry(entry: dict[str, Any]) -> None:
        rnd = entry.get("round")
        x = rnd if isinstance(rnd, int) else (entry.get("updates") or 0) / p.job.per_round
        progress.entry(float(x))

    try:
        raw = engine.run(p.job, on_entry)
    except RunFailed as exc:
        raise RunFailed(f"{p.job.label}: {exc}") from None
    (p.job.folder / "history.jsonl").write_text(
        "".join(json.dumps(entry) + "\n" for entry in raw.entries)
    )
    figures = measure(
        raw, per_round=p.job.per_round, workers=p.job.workers, target=e.target, also=e.also
    )
    if resolved.get("CLOCK") != "virtual":  # the real clock's sim_seconds are wall seconds
        figures["sim_seconds_to_target"] = None
        figures["also"] = [{**hit, "sim_seconds": None} for hit in figures["also"]]
    result = {
        "experiment": e.name,
        "cell": p.cell.number,
        "cell_key": p.job.folder.parent.name,
        "axes": p.cell.axes,
        "settings": p.job.settings,
        "seed": p.seed,
        "workers": p.job.workers,
        "engine": engine.name,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **machine(),
        **figures,
    }
    if started is not None:
        result |= {"sweep_load_start": started.load, "loaded": started.loaded}
    write_json(p.result, result)
    progress.end(outcome_line(result))
    return result


def sweep(
    e: Experiment,
    engine: Engine,
    folder: Path,
    *,
    progress: Progress | None = None,
    out: Callable[[str], None] = print,
    engine_for: Callable[[str], Engine] | None = None,
    started: Started | None = None,
) -> list[dict[str, Any]]:
    """Run what is not finished yet, then write the report; the results, in plan order.

    `engine` runs the cells; a cell of the grid's engine axis runs on `engine_for(its
    engine)` when that is another one."""
    folder.mkdir(parents=True, exist_ok=True)
    if e.path.resolve() != (folder / "experiment.toml").resolve():
        shutil.copyfile(e.path, folder / "experiment.toml")
    write_json(folder / SWEEP, {"engine": engine.name})
    planned = plan(e, folder)
    done = {p.job.folder: finished(p) for p in planned}
    for p in planned:  # numbered and named as in this file, which may list them otherwise
        if done[p.job.folder] is not None:
            done[p.job.folder] |= {"cell": p.cell.number, "axes": p.cell.axes}
    todo = [p for p in planned if done[p.job.folder] is None]
    out(
        f"{e.name}: {len(e.cells)} cells x {len(e.seeds)} seeds = {len(planned)} runs on the "
        f"{engine.name} engine; {len(planned) - len(todo)} finished before, {len(todo)} to run; "
        f"results in {folder}"
    )
    if progress is None:
        progress = Progress(len(planned), sum(p.job.expected_rounds for p in planned))
    engines: dict[str, Engine] = {}

    def engine_of(cell: Cell) -> Engine:
        name = e.engine_of(cell)
        if name not in engines:
            if name != engine.name and engine_for is None:
                raise RunFailed(f"cell {cell.title}: no {name} engine to run it on")
            engines[name] = engine if name == engine.name else engine_for(name)  # type: ignore[misc]
            engines[name].prepare()
        return engines[name]

    failed: list[str] = []
    for p in planned:
        if done[p.job.folder] is not None:
            progress.skip(p.job.expected_rounds)
            continue
        try:
            done[p.job.folder] = run_one(e, engine_of(p.cell), p, progress, started)
        except RunFailed as exc:
            # One run's failure (a model that diverged, a worker that died) is a result of
            # the sweep, not its end: the others still run. It has no result.json, so the
            # same command runs it again.
            (p.job.folder / "failed.txt").write_text(f"{exc}\n")
            progress.end(f"failed: {exc}")
            failed.append(str(exc))
    results = [r for r in done.values() if r is not None]
    written = report.write(e, results, folder)
    for line in report.against_floor(e, results):
        out(line)
    out("report: " + ", ".join(str(path) for path in written))
    if failed:
        raise SweepFailed(failed)
    return results


class SweepFailed(RunFailed):
    """Some runs failed; the others ran and the report holds them."""

    def __init__(self, failed: list[str]) -> None:
        self.failed = failed
        super().__init__(f"{len(failed)} run(s) failed: " + "; ".join(failed))
