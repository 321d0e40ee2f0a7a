"""The run's history: the global model's test accuracy and loss, one entry per evaluated version.

Kept in `<MODEL_DIR>/history.jsonl`, one JSON object per line, appended and
fsynced as each evaluation arrives, so it survives restarts:

    {"version": 12, "round": 4, "time": "2026-11-28T10:00:00+00:00",
     "accuracy": 0.9677, "loss": 0.113, "samples": 60000, "updates": 12,
     "clients": ["client-1", "client-3"]}

`round` is the number of the round that made the version (null under the
asynchronous rules); `sim_seconds` the run's clock when it was made (simulated
seconds under CLOCK=virtual, real ones x TIME_SCALE else); `samples` and `updates` are those aggregated so far;
`clients` are the logical clients whose updates went into the version since the
previous evaluated one. A version appears once: a later entry for the same
version replaces an earlier one (a version re-made after a restart). Readers
skip a torn last line, which is all a crash mid-append can leave.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("fedsim.aggregator")

FILE = "history.jsonl"
COLUMNS = (
    "version", "round", "time", "sim_seconds", "accuracy", "loss", "samples", "updates", "clients"
)  # fmt: skip


def path_in(model_dir: Path) -> Path:
    return model_dir / FILE


def _valid(entry: object) -> bool:
    if not isinstance(entry, dict):
        return False
    version, accuracy, loss = entry.get("version"), entry.get("accuracy"), entry.get("loss")
    return (
        isinstance(version, int)
        and version >= 0
        and isinstance(accuracy, int | float)
        and isinstance(loss, int | float)
        and math.isfinite(accuracy)
        and math.isfinite(loss)
    )


def read(model_dir: Path) -> list[dict[str, Any]]:
    """The entries in `model_dir`, one per version, oldest version first; [] when none."""
    path = path_in(model_dir)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    by_version: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            log.warning("%s line %d is not JSON (a torn write?): skipped", path, number)
            continue
        if not _valid(entry):
            log.warning("%s line %d is not a history entry: skipped", path, number)
            continue
        by_version[entry["version"]] = entry
    return [by_version[v] for v in sorted(by_version)]


def append(model_dir: Path, entry: Mapping[str, Any]) -> None:
    """Add one entry durably (append, flush, fsync)."""
    line = json.dumps(dict(entry), separators=(",", ":")) + "\n"
    path = path_in(model_dir)
    # After a torn last line (a crash mid-append), start on a line of our own: its last
    # byte tells, read alone so an append does not grow with the history's length.
    if _last_byte(path) not in (b"", b"\n"):
        line = "\n" + line
    with open(path, "a", encoding="utf-8") as out:
        out.write(line)
        out.flush()
        os.fsync(out.fileno())


def _last_byte(path: Path) -> bytes:
    """The file's last byte; b"" when it is empty or absent."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return b""
            f.seek(-1, os.SEEK_END)
            return f.read(1)
    except FileNotFoundError:
        return b""


def rewrite(model_dir: Path, entries: Iterable[Mapping[str, Any]]) -> None:
    """Replace the file with `entries` atomically (at resume: drop versions a crash lost)."""
    from fedsim.checkpoints import write_atomic

    text = "".join(json.dumps(dict(e), separators=(",", ":")) + "\n" for e in entries)
    write_atomic(path_in(model_dir), text.encode("utf-8"))


def to_csv(entries: Iterable[Mapping[str, Any]]) -> str:
    """The entries as CSV with a header row; `clients` joined by spaces."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for entry in entries:
        row = []
        for column in COLUMNS:
            value = entry.get(column)
            if column == "clients":
                value = " ".join(value or [])
            row.append("" if value is None else value)
        writer.writerow(row)
    return out.getvalue()


def best_and_last(entries: list[Mapping[str, Any]]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """The entry with the highest accuracy (the earliest of equals) and the newest one."""
    if not entries:
        raise ValueError("no history entries")
    best = max(entries, key=lambda e: (e["accuracy"], -e["version"]))
    return best, entries[-1]
