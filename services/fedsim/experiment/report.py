"""The report of a sweep: runs.csv, summary.md and curves.png, from the runs' result.json.

- runs.csv: one row per cell and seed: the grid's values, the settings, the
  figures of outcome.measure, the load the run was taken under.
- summary.md: fedsim's version, the machine and its load; the tables of
  tables.py (the cells, the memory growth by process, one per grid axis when
  there are several); each cell's seconds against the plain Keras floor's.
- curves.png: test accuracy per round, a line per cell and the spread over
  the seeds as a band (curves.py).

`python -m fedsim.experiment --report results/<name>` writes them again from the
runs' files without running anything.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fedsim.experiment import outcome
from fedsim.experiment.spec import FLOOR, Experiment
from fedsim.experiment.tables import (
    axis_table,
    by_cell,
    cells_table,
    growth_table,
    load_range,
    of,
    shown,
)

FIGURES = (
    "status", "rounds", "evaluations", "final_accuracy", "final_loss", "best_accuracy",
    "best_round", "target", "rounds_to_target", "rounds_to_target_interpolated",
    "seconds_to_target", "sim_seconds_to_target",
    "seconds",
    "seconds_per_round", "train_seconds", "slowest_worker_seconds", "outside_training",
    "bytes_to_workers",
    "bytes_from_workers", "peak_memory_bytes", "memory_growth_bytes", "memory_growth_by_process",
    "refused_aggregates",
    "stopped", "epsilon", "aggregator_seconds_per_round", "aggregator_peak_memory_bytes", "status_bytes",
    "history_bytes", "load_start", "load_end",
)  # fmt: skip
MACHINE = ("fedsim", "cpus", "memory_bytes", "finished_at", "sweep_load_start", "loaded")


def pairs(settings: dict[str, str]) -> str:
    """KEY=VALUE KEY="A VALUE" ..., as in .env."""
    return " ".join(f'{k}="{v}"' if " " in v or not v else f"{k}={v}" for k, v in settings.items())


def further(t: float) -> tuple[str, str, str]:
    """runs.csv's columns for a further target: rounds_to_0.95, seconds_to_0.95,
    sim_seconds_to_0.95."""
    return f"rounds_to_{t:g}", f"seconds_to_{t:g}", f"sim_seconds_to_{t:g}"


def columns(e: Experiment) -> list[str]:
    extra = [c for t in e.also for c in further(t)]
    return ["experiment", "cell", *e.axes, "seed", "workers", "engine", "settings",
            *FIGURES, *extra, *MACHINE]  # fmt: skip


def rows(e: Experiment, results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in results:
        row = {k: r.get(k) for k in columns(e)}
        row.update({axis: r["axes"].get(axis) for axis in e.axes})
        row["settings"] = pairs(r["settings"])
        by_process = r.get("memory_growth_by_process")
        if by_process:  # aggregator=1048576 worker-1=-4096 (bytes)
            row["memory_growth_by_process"] = " ".join(f"{k}={v}" for k, v in by_process.items())
        for hit in r.get("also", []):
            rounds, seconds, sim = further(hit["target"])
            if rounds in row:
                row[rounds], row[seconds] = hit["rounds"], hit["seconds"]
                row[sim] = hit.get("sim_seconds")
        out.append(row)
    return out


def write_csv(e: Experiment, results: Sequence[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns(e), lineterminator="\n")
        writer.writeheader()
        for row in rows(e, results):
            writer.writerow({k: "" if v is None else v for k, v in row.items()})


def header(e: Experiment, results: Sequence[dict[str, Any]]) -> list[str]:
    versions = sorted({str(r.get("fedsim")) for r in results})
    cpus = sorted({str(r.get("cpus")) for r in results})
    memory = sorted({f"{r['memory_bytes'] / 2**30:.1f} GiB" for r in results
                     if r.get("memory_bytes")})  # fmt: skip
    engines = sorted({str(r.get("engine")) for r in results})
    base = pairs(e.base) or "the code's defaults"
    train = sum(of(results, "train_seconds"))
    spent = sum(r["seconds"] * r["workers"] for r in results if r.get("seconds"))
    lines = [f"# {e.name}", ""]
    if e.description:
        lines += [e.description, ""]
    lines += [
        f"fedsim {', '.join(versions)}; the {', '.join(engines)} engine; "
        f"{', '.join(cpus)} cores, {', '.join(memory) or '? GiB'} of memory; the runs were "
        f"taken at a 1-minute load of {load_range(results)}.",
        "",
        f"Every cell: {base}; {e.workers} workers unless the grid says; seeds "
        f"{', '.join(map(str, e.seeds))}; stop: {e.stop}"
        + (
            "; target: " + ", ".join(f"{t:.0%}" for t in e.targets) + " test accuracy."
            if e.targets
            else "."
        ),
        "",
        "Figures are the mean ± the sample standard deviation over the seeds; rounds and "
        "seconds to the target are over the seeds that reached it, with how many did. "
        "Times are comparable only between runs taken under a similar load.",
        "",
    ]
    lines += _starts(results)
    if spent:
        lines += [
            f"Outside training (start-up, evaluation, HTTP, waiting): {1 - train / spent:.0%} "
            f"of the workers' time ({train:.0f} s of training in {spent:.0f} worker-seconds).",
            "",
        ]
    return lines


def _starts(results: Sequence[dict[str, Any]]) -> list[str]:
    """What the load was when the sweeps that made these runs started (a sweep refuses
    above the limit unless forced); nothing for runs from before the check."""
    starts = [r for r in results if r.get("sweep_load_start") not in (None, "")]
    if not starts:
        return []
    loaded = [r for r in starts if str(r.get("loaded")).lower() == "true"]
    top = max(float(r["sweep_load_start"]) for r in starts)
    if not loaded:
        return [f"Each sweep started on an idle machine (1-minute load at most {top:.2f}).", ""]
    return [
        f"**Loaded:** {len(loaded)} of {len(results)} runs come from a sweep forced to start "
        f"above a 1-minute load of 1.0 (up to {top:.2f}); their times are not comparable "
        "with the others'.",
        "",
    ]


def against_floor(e: Experiment, results: Sequence[dict[str, Any]]) -> list[str]:
    """Each cell's seconds against the plain Keras floor's on the same settings and seeds:
    `w1 workers=3  13.0s / 10.5s = 1.24x plain Keras (aim 1.2x)`. The ratio is the mean
    of the per-seed ratios (± their spread); none without a keras cell of those settings."""
    cells = by_cell(e, results)
    floors = {
        json.dumps(c.settings, sort_keys=True): cells.get(c.number, [])
        for c in e.cells
        if e.engine_of(c) == FLOOR
    }
    lines = []
    for c in e.cells:
        floor = floors.get(json.dumps(c.settings, sort_keys=True))
        if e.engine_of(c) == FLOOR or not floor or c.number not in cells:
            continue
        base = {r["seed"]: r["seconds"] for r in floor if r.get("seconds")}
        paired = [(r["seconds"], base[r["seed"]]) for r in cells[c.number]
                  if r.get("seconds") and r["seed"] in base]  # fmt: skip
        if not paired:
            continue
        ours = statistics.fmean(p[0] for p in paired)
        plain = statistics.fmean(p[1] for p in paired)
        ratio = shown([a / b for a, b in paired], "{:.2f}x")
        title = " ".join(f"{k}={v}" for k, v in c.axes.items() if k != "engine")
        lines.append(
            f"{e.name} {title}  {ours:.1f}s / {plain:.1f}s = {ratio} plain Keras"
            + (f" (aim {e.aim:g}x)" if e.aim is not None else "")
            + f", {len(paired)} seed{'s' if len(paired) > 1 else ''}"
        )
    return lines


def summary(e: Experiment, results: Sequence[dict[str, Any]]) -> str:
    cells = by_cell(e, results)
    lines = [*header(e, results), "## Cells", "", *cells_table(e, cells), ""]
    floor = against_floor(e, results)
    if floor:
        lines += [
            "## Against the plain Keras floor",
            "",
            "Seconds from start to end, each run against the floor's run of the same settings "
            "and seed (experiment/floor.py: the same training in "
            + ("one process" if e.floor_processes == 1 else f"{e.floor_processes} processes")
            + ", evaluation after every round included).",
            "",
            "```",
            *floor,
            "```",
            "",
        ]
    lines += growth_table(e, cells)
    if len(e.axes) > 1:
        for axis in e.axes:
            lines += [f"## By {axis}: final accuracy", "", *axis_table(e, axis, cells), ""]
    missing = len(e.cells) * len(e.seeds) - len(results)
    if missing:
        lines += [f"{missing} of {len(e.cells) * len(e.seeds)} runs are not done yet.", ""]
    return "\n".join(lines)


def write(e: Experiment, results: Sequence[dict[str, Any]], folder: Path) -> list[Path]:
    """runs.csv, summary.md and curves.png in `folder`; the paths written."""
    from fedsim.experiment import curves

    paths = [folder / "runs.csv", folder / "summary.md", folder / "curves.png"]
    write_csv(e, results, paths[0])
    paths[1].write_text(summary(e, results))
    curves.plot(e, results, paths[2])
    return paths


def collect(e: Experiment, folder: Path, engine: str) -> list[dict[str, Any]]:
    """The finished runs of `e`'s cells in `folder`, in the plan's order."""
    out = []
    for cell in e.cells:
        key = cell.key(cell.engine or engine, e.stop, e.target)
        for seed in e.seeds:
            path = folder / "runs" / key / f"seed-{seed}" / "result.json"
            try:
                result = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            # Growth and the interpolated rounds read again from the curve: runs measured
            # before growth was read between medians (outcome.GROWTH_WINDOW), or before
            # the interpolation, are shown as the headings say.
            again = outcome.reread(result.get("curve") or [], result.get("target"))
            out.append(result | again | {"cell": cell.number, "axes": cell.axes})
    return out
