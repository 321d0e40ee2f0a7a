"""Helpers shared by the benchmarks that drive whole local runs (scripts/simulate.sh).

Where MNIST is, a free port, the resident memory of a run's processes, the
run's history as it grows, and stopping a run's process group. Each benchmark
prints its own results; nothing here prints.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> str:
    """The folder holding the MNIST files: DATA_DIR, FEDSIM_TEST_MNIST, ./data or ../shared/mnist."""
    for candidate in (
        os.environ.get("DATA_DIR"),
        os.environ.get("FEDSIM_TEST_MNIST"),
        ROOT / "data",
        ROOT.parent / "shared" / "mnist",
    ):
        if candidate and (Path(candidate) / "t10k-labels-idx1-ubyte.gz").is_file():
            return str(candidate)
    sys.exit(f"{Path(sys.argv[0]).stem}: no MNIST files found; set DATA_DIR")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss(root: int) -> int:
    """Resident bytes of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        pid = int(entry.name)
        children.setdefault(int(fields["PPid"]), []).append(pid)
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def read_history(path: Path) -> list[dict]:
    """The history's entries; a torn last line (mid-append) is skipped."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the run's process group (simulate.sh, gunicorn, workers), then SIGKILL."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
