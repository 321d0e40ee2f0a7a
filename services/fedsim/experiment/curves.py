"""curves.png: test accuracy per round, a line per cell, the spread over the seeds as a band.

At each round the line is the mean over the seeds that evaluated it, the band
the mean ± the sample standard deviation (none with one seed). Asynchronous
rules are placed by their updates divided by the clients of a round.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsim.experiment.spec import Experiment


def band(runs: Sequence[dict[str, Any]]) -> tuple[list[float], list[float], list[float]]:
    """x, mean and standard deviation (0 for one seed) of the runs' accuracy at each x."""
    at: dict[float, list[float]] = {}
    for run in runs:
        for point in run.get("curve", []):
            at.setdefault(point["x"], []).append(point["accuracy"])
    xs = sorted(at)
    means = [statistics.fmean(at[x]) for x in xs]
    sds = [statistics.stdev(at[x]) if len(at[x]) > 1 else 0.0 for x in xs]
    return xs, means, sds


def plot(e: Experiment, results: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    try:
        for cell in e.cells:
            runs = [r for r in results if r["cell"] == cell.number]
            if not runs:
                continue
            xs, means, sds = band(runs)
            (line,) = ax.plot(xs, means, label=f"{cell.title} ({len(runs)} seeds)", lw=1.5)
            ax.fill_between(
                xs,
                [m - s for m, s in zip(means, sds, strict=True)],
                [m + s for m, s in zip(means, sds, strict=True)],
                color=line.get_color(),
                alpha=0.2,
                lw=0,
            )
        if e.target is not None:
            ax.axhline(e.target, color="grey", ls="--", lw=1, label=f"target {e.target:.0%}")
        ax.set_xlabel("round (asynchronous rules: updates / clients per round)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{e.name}: mean over seeds, band ± 1 standard deviation")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small", loc="lower right")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
