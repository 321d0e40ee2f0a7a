"""PNG figures of a run: the learning curve, the confusion matrix, the clients' label mix.

matplotlib with the non-interactive Agg backend, set before anything else of
matplotlib loads; figures are built with the object-oriented API (`Figure`,
no pyplot and its global state), so nothing is shown and nothing leaks
between figures. Every figure has a fixed size in pixels (`*_SIZE` at `DPI`,
saved without `bbox_inches="tight"`, which would change it), so a report's
PNGs have known dimensions. Bad input raises `ValueError` with one line
naming what is wrong.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot could be imported anywhere: no display needed

import numpy as np
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100
LEARNING_CURVE_SIZE = (1000, 500)  # width, height in pixels
CONFUSION_SIZE = (700, 600)
CLIENTS_SIZE = (1200, 500)
DIGITS = 10
MAX_CLIENT_TICKS = 30  # beyond this, every k-th client is labelled
STYLE = {
    "font.size": 11,
    "axes.titlesize": 12,
    "figure.titlesize": 13,
    "axes.grid": False,
    "savefig.facecolor": "white",
}


def _figure(size: tuple[int, int]) -> Figure:
    width, height = size
    return Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")


def _save(figure: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI)
    return path


def x_axis(entries: Sequence[Mapping[str, Any]]) -> tuple[str, list[int]]:
    """("round", rounds) when every entry has a round, else ("version", versions)."""
    if all(isinstance(e.get("round"), int) and not isinstance(e["round"], bool) for e in entries):
        return "round", [e["round"] for e in entries]
    return "version", [e["version"] for e in entries]


def learning_curve(entries: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Test accuracy (left) and test loss (right) of the global model per round.

    The x axis is the round when every entry has one (round rules), else the
    model version (asynchronous rules record no round). The best accuracy is
    marked. `entries` are history entries (`fedsim.aggregator.history`).
    """
    if not entries:
        raise ValueError("no history entries to plot")
    for number, entry in enumerate(entries, 1):
        for field in ("version", "accuracy", "loss"):
            value = entry.get(field)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"history entry {number} has no finite {field}: {value!r}")
    key, _ = x_axis(entries)
    ordered = sorted(entries, key=lambda e: e[key])
    x = [e[key] for e in ordered]
    accuracy = [e["accuracy"] for e in ordered]
    loss = [e["loss"] for e in ordered]
    marker = "o" if len(ordered) <= 60 else None
    best = max(range(len(ordered)), key=lambda i: (accuracy[i], -i))

    with matplotlib.rc_context(STYLE):
        figure = _figure(LEARNING_CURVE_SIZE)
        left, right = figure.subplots(1, 2)
        left.plot(x, accuracy, marker=marker, markersize=4, color="tab:blue")
        left.plot([x[best]], [accuracy[best]], "*", markersize=14, color="tab:orange")
        left.annotate(
            f"best {accuracy[best]:.4f} ({key} {x[best]})",
            (x[best], accuracy[best]),
            xytext=(0, -18),
            textcoords="offset points",
            ha="right" if best > len(ordered) / 2 else "left",
            bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none"},
        )
        left.set_title("test accuracy")
        left.set_ylabel("accuracy on the 10,000 test images")
        right.plot(x, loss, marker=marker, markersize=4, color="tab:red")
        right.set_title("test loss")
        right.set_ylabel("cross-entropy loss")
        for axes in (left, right):
            axes.set_xlabel("round" if key == "round" else "model version")
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            axes.grid(alpha=0.3)
        figure.suptitle(title)
        return _save(figure, path)


def confusion_heatmap(confusion: Sequence[Sequence[int]], path: Path, title: str) -> Path:
    """The confusion matrix as a heat map, each cell's count written in it.

    Rows are the true digit, columns the predicted one. The colour scale is a
    square root (`PowerNorm(0.5)`) so that the few hundred errors stay visible
    beside the diagonal's thousands.
    """
    matrix = np.asarray(confusion)
    if matrix.shape != (DIGITS, DIGITS):
        raise ValueError(f"confusion matrix must be {DIGITS}x{DIGITS}, not of shape {matrix.shape}")
    if not np.issubdtype(matrix.dtype, np.integer) or (matrix < 0).any():
        raise ValueError("confusion matrix must hold non-negative whole counts")
    norm = PowerNorm(0.5, vmin=0, vmax=max(int(matrix.max()), 1))

    with matplotlib.rc_context(STYLE):
        figure = _figure(CONFUSION_SIZE)
        axes = figure.subplots()
        image = axes.imshow(matrix, cmap="Blues", norm=norm)
        for true in range(DIGITS):
            for predicted in range(DIGITS):
                count = int(matrix[true, predicted])
                axes.text(
                    predicted,
                    true,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="white" if norm(count) > 0.6 else "black",
                )
        axes.set_xticks(range(DIGITS))
        axes.set_yticks(range(DIGITS))
        axes.set_xlabel("predicted digit")
        axes.set_ylabel("true digit")
        figure.colorbar(image, ax=axes, label="test images")
        axes.set_title(title)
        return _save(figure, path)


def _client_counts(manifest: Mapping[str, Any]) -> tuple[list[str], np.ndarray]:
    clients = manifest.get("clients") if isinstance(manifest, Mapping) else None
    if not isinstance(clients, list) or not clients:
        raise ValueError("partition manifest has no list of clients")
    ids, counts = [], []
    for number, client in enumerate(clients, 1):
        labels = client.get("labels") if isinstance(client, Mapping) else None
        if (
            not isinstance(labels, list)
            or len(labels) != DIGITS
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in labels)
        ):
            raise ValueError(
                f"partition manifest client {number} has no label histogram "
                f"of {DIGITS} non-negative counts"
            )
        ids.append(str(client.get("id", number)))
        counts.append(labels)
    return ids, np.asarray(counts, dtype=np.int64)


def _tick_labels(ids: list[str]) -> tuple[list[str], str]:
    """Short tick labels: the numbers when every id is `client-<n>`, else the ids."""
    numbers = [re.fullmatch(r"client-(\d+)", i) for i in ids]
    if all(numbers):
        return [m.group(1) for m in numbers], "logical client (client-N)"
    return ids, "logical client"


def label_distribution(manifest: Mapping[str, Any], path: Path, title: str) -> Path:
    """Each logical client's training images as a bar stacked by digit.

    `manifest` is the partition plan (`partitions.json`): its `clients` list,
    each with an `id` and `labels`, the 10 per-digit counts. IID clients show
    ten even bands; McMahan's `shards` one or two colours per bar; a small
    Dirichlet alpha uneven mixes and sizes. Up to a few hundred clients stay
    readable: bars touch when there are many, and only every k-th is labelled.
    """
    ids, counts = _client_counts(manifest)
    n = len(ids)
    x = np.arange(n)
    labels, xlabel = _tick_labels(ids)
    step = max(1, math.ceil(n / MAX_CLIENT_TICKS))
    long_labels = max(len(label) for label in labels[::step]) > 4

    with matplotlib.rc_context(STYLE):
        figure = _figure(CLIENTS_SIZE)
        axes = figure.subplots()
        colours = matplotlib.colormaps["tab10"]
        bottom = np.zeros(n, dtype=np.int64)
        for digit in range(DIGITS):
            axes.bar(
                x,
                counts[:, digit],
                bottom=bottom,
                width=0.8 if n <= 50 else 0.85 if n <= 150 else 1.0,
                color=colours(digit),
                linewidth=0,
                label=str(digit),
            )
            bottom += counts[:, digit]
        axes.set_xlim(-0.5 - (0.1 if n <= 50 else 0), n - 0.5 + (0.1 if n <= 50 else 0))
        axes.set_xticks(x[::step], labels[::step], rotation=90 if long_labels else 0, fontsize=9)
        axes.set_xlabel(xlabel if step == 1 else f"{xlabel}, one in {step} labelled")
        axes.set_ylabel("training images")
        axes.yaxis.grid(alpha=0.3)
        axes.set_axisbelow(True)
        handles, names = axes.get_legend_handles_labels()
        # Top of the stack first, as the bars read from the top.
        figure.legend(handles[::-1], names[::-1], title="digit", loc="outside right upper")
        axes.set_title(title)
        return _save(figure, path)
