"""The summary's tables and the numbers in their cells, from the runs' result.json.

- The cells table: a row per cell, each figure the mean ± the sample standard
  deviation over the seeds (n - 1; one seed shows its value alone), the best cell
  in bold, rounds-to-target with how many seeds reached it, the aggregator's own
  time per round and peak memory when its runs report them.
- The growth table: each run's memory growth by process, when it sampled its
  processes apart.
- An axis table per grid axis: its values down, the other axes' combinations
  across, the final accuracy in each.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from fedsim.experiment.outcome import GROWTH_FROM_ROUND, GROWTH_WINDOW
from fedsim.experiment.spec import Experiment

# The aggregator's own figures in the cells table: heading, format, scale.
OWN: dict[str, tuple[str, str, float]] = {
    "aggregator_seconds_per_round": ("aggregator ms / round", "{:.1f}", 1e-3),
    "aggregator_peak_memory_bytes": ("aggregator peak (MiB)", "{:.0f}", 2**20),
}


# --- numbers ---------------------------------------------------------------------------


def mean_sd(values: Sequence[float]) -> tuple[float, float | None] | None:
    """Mean and sample standard deviation; sd None for one value; None for none."""
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def shown(values: Sequence[float], fmt: str = "{:.2%}", scale: float = 1.0) -> str:
    """Mean ± spread, e.g. 91.45% ± 0.32%; one value alone; "-" for none."""
    got = mean_sd([v / scale for v in values])
    if got is None:
        return "-"
    m, sd = got
    return fmt.format(m) + ("" if sd is None else " ± " + fmt.format(sd))


def of(runs: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in runs if r.get(key) is not None]


def reached(runs: Sequence[dict[str, Any]], key: str) -> str:
    """Mean ± sd over the seeds that reached the target, and how many did: "12 ± 2 (2/3)"."""
    values = of(runs, key)
    if not values:
        return f"not reached (0/{len(runs)})"
    return f"{shown(values, '{:.1f}')} ({len(values)}/{len(runs)})"


def load_range(runs: Sequence[dict[str, Any]]) -> str:
    loads = of(runs, "load_start") + of(runs, "load_end")
    return f"{min(loads):.2f}-{max(loads):.2f}" if loads else "-"


# --- tables ----------------------------------------------------------------------------


def by_cell(e: Experiment, results: Sequence[dict[str, Any]]) -> dict[int, list[dict]]:
    cells: dict[int, list[dict]] = {c.number: [] for c in e.cells}
    for r in results:
        cells.setdefault(r["cell"], []).append(r)
    return {n: runs for n, runs in cells.items() if runs}


def best(cells: dict[Any, list[dict]]) -> set[Any]:
    """The cells with the highest mean final accuracy (all of them when tied)."""
    means = {n: statistics.fmean(of(runs, "final_accuracy")) for n, runs in cells.items()
             if of(runs, "final_accuracy")}  # fmt: skip
    top = max(means.values(), default=None)
    return {n for n, m in means.items() if m == top}


def bold(text: str, yes: bool) -> str:
    return f"**{text}**" if yes else text


def table(head: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(row) + " |" for row in body),
    ]


def cells_table(e: Experiment, cells: dict[int, list[dict]]) -> list[str]:
    t = f"{e.target:.0%}" if e.target is not None else None
    head = ["cell", *e.axes, "seeds", "final accuracy", "best accuracy"]
    if t:
        # interpolated: as McMahan et al. read rounds to a target (outcome.crossing)
        head += [f"rounds to {t}", f"rounds to {t}, interpolated", f"seconds to {t}"]
    head += [f"rounds to {a:.0%}" for a in e.also]
    # CLOCK=virtual runs only: under the real clock the history's sim_seconds are wall ones.
    simulated = any(
        r.get("settings", {}).get("CLOCK") == "virtual" for runs in cells.values() for r in runs
    )
    if simulated:  # CLOCK=virtual: the time a deployment of this population would take
        head += [f"simulated s to {x:.0%}" for x in ((e.target,) if t else ()) + e.also]
    private = any(r.get("epsilon") is not None for runs in cells.values() for r in runs)
    head += ["ε at DP_DELTA"] if private else []
    # Runs of an aggregator that reports its own time and memory (older runs.csv have none).
    own = [k for k in ("aggregator_seconds_per_round", "aggregator_peak_memory_bytes")
           if any(r.get(k) is not None for runs in cells.values() for r in runs)]  # fmt: skip
    head += [OWN[k][0] for k in own]
    head += ["rounds", "seconds", "MB to / from workers", "peak memory (GiB)", "load"]
    top = best(cells)
    titles = {c.number: c.axes for c in e.cells}
    body = []
    for n, runs in cells.items():
        axes = titles.get(n) or runs[0]["axes"]
        row = [bold(str(n), n in top), *(f"`{axes.get(a, '')}`" for a in e.axes), str(len(runs))]
        row += [bold(shown(of(runs, "final_accuracy")), n in top), shown(of(runs, "best_accuracy"))]
        if t:
            row += [reached(runs, k) for k in
                    ("rounds_to_target", "rounds_to_target_interpolated", "seconds_to_target")]  # fmt: skip
        for a in e.also:
            hits = [{"r": h["rounds"]} for r in runs for h in r.get("also", []) if h["target"] == a]
            row.append(reached(hits, "r"))
        if simulated:
            if t:
                row.append(reached(runs, "sim_seconds_to_target"))
            for a in e.also:
                hits = [{"s": h.get("sim_seconds")} for r in runs for h in r.get("also", [])
                        if h["target"] == a]  # fmt: skip
                row.append(reached(hits, "s"))
        if private:
            eps = of(runs, "epsilon")  # inf: DP_NOISE=0, clipping without a bound
            row.append("∞" if eps and all(map(math.isinf, eps)) else shown(eps, "{:.2f}"))
        row += [shown(of(runs, k), *OWN[k][1:]) for k in own]
        mb = (shown(of(runs, "bytes_to_workers"), "{:.1f}", 1e6) + " / "
              + shown(of(runs, "bytes_from_workers"), "{:.1f}", 1e6))  # fmt: skip
        row += [
            # "4" when every seed ran the same rounds, "21.3 ± 1.5" when they stopped apart
            shown(of(runs, "rounds"), "{:g}" if len(set(of(runs, "rounds"))) == 1 else "{:.1f}"),
            shown(of(runs, "seconds"), "{:.0f}"),
            mb,
            shown(of(runs, "peak_memory_bytes"), "{:.2f}", 2**30),
            load_range(runs),
        ]
        body.append(row)
    return table(head, body)


def growth_table(e: Experiment, cells: dict[int, list[dict]]) -> list[str]:
    """Each run's memory growth from round GROWTH_FROM_ROUND to its end, by process (or
    container), beside the total's; nothing when no run sampled its processes apart."""
    runs = [(n, r) for n, rs in cells.items() for r in rs if r.get("memory_growth_by_process")]
    if not runs:
        return []
    found = {k for _, r in runs for k in r["memory_growth_by_process"]}
    # alphabetical, numbers by value: worker-2 before worker-10, client-2 before client-10
    names = sorted(found, key=lambda k: [int(t) if t.isdigit() else t
                                         for t in re.split(r"(\d+)", k)])  # fmt: skip
    head = ["cell", *e.axes, "seed", "all", *names]
    titles = {c.number: c.axes for c in e.cells}

    def mib(v: float | None) -> str:
        return "-" if v is None else f"{v / 2**20:+.1f}"

    body = []
    for n, r in runs:
        axes = titles.get(n) or r["axes"]
        parts = r["memory_growth_by_process"]
        body.append([str(n), *(f"`{axes.get(a, '')}`" for a in e.axes), str(r["seed"]),
                     mib(r.get("memory_growth_bytes")), *(mib(parts.get(k)) for k in names)])  # fmt: skip
    return [
        f"## Memory growth by process (MiB, from round {GROWTH_FROM_ROUND} to the end, "
        f"medians of up to {GROWTH_WINDOW} readings at each end)",
        "",
        *table(head, body),
        "",
    ]


def axis_table(e: Experiment, axis: str, cells: dict[int, list[dict]]) -> list[str]:
    """The axis's values down, the other axes' combinations across: final accuracy."""
    others = [a for a in e.axes if a != axis]
    columns: dict[tuple, dict[str, list[dict]]] = {}
    for c in e.cells:
        if c.number not in cells:
            continue
        across = tuple(c.axes[a] for a in others)
        columns.setdefault(across, {})[c.axes[axis]] = cells[c.number]
    values = list(dict.fromkeys(v for col in columns.values() for v in col))
    tops = {k: best(col) for k, col in columns.items()}
    head = [axis] + [" ".join(f"{a}={v}" for a, v in zip(others, k, strict=True)) for k in columns]
    body = []
    for value in values:
        row = [f"`{value}`"]
        for k, col in columns.items():
            runs = col.get(value)
            row.append("-" if runs is None else bold(shown(of(runs, "final_accuracy")),
                                                       value in tops[k]))  # fmt: skip
        body.append(row)
    return table(head, body)
