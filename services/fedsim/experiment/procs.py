"""Processes: free ports, starting a process group, and what its processes use (memory, CPU).

Everything is read from /proc, so a figure is the processes' own, whatever the
machine's load. The experiment runner's local engine and the benchmarks in
scripts/ (through scripts/benchlib) share this module.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    argv: Sequence[str | Path], *, env: dict[str, str], log: Path, cwd: Path | None = None
) -> subprocess.Popen:
    """`argv` in its own process group (stopped as one by stop()), output into `log`,
    stdin closed (a worker started from a terminal would ask for a client id)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(a) for a in argv],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to the process group (a script, gunicorn, its workers), then SIGKILL."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        proc.poll()
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    else:
        # What the group's leader left behind (gunicorn's worker, a prefixer).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def children(pid: int) -> list[int]:
    """The direct children of a process (none when it is gone)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _table() -> tuple[dict[int, list[int]], dict[int, int]]:
    """Every process's children and resident bytes, from one pass over /proc."""
    kids: dict[int, list[int]] = {}
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
        kids.setdefault(int(fields["PPid"]), []).append(pid)
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    return kids, rss


def _tree(roots: Sequence[int], kids: dict[int, list[int]], rss: dict[int, int]) -> int:
    total, todo, seen = 0, list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += rss.get(pid, 0)
        todo.extend(kids.get(pid, []))
    return total


def tree_rss(*roots: int) -> int:
    """Resident bytes of processes and all their descendants, each counted once."""
    return _tree(roots, *_table())


def trees_rss(roots: Mapping[str, int]) -> dict[str, int]:
    """Resident bytes of each named process with its descendants ({"aggregator": pid, ...}
    -> {"aggregator": bytes, ...}), all read at the same moment. A process that has exited
    (gone, or a zombie, which has no resident memory) is left out rather than read as 0;
    trees are meant to be apart (one inside another would be counted in both)."""
    kids, rss = _table()
    return {name: _tree([pid], kids, rss) for name, pid in roots.items() if rss.get(pid)}


def vm_hwm_kib(pid: int) -> int:
    """A process's peak resident memory (VmHWM), as the kernel keeps it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its direct children (nginx's workers)."""
    ticks = 0
    for p in [pid, *children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


class PeakMemory(threading.Thread):
    """Samples a memory figure every `every` seconds until stopped: the last, its parts and
    the peak.

    `source` is a pid (its tree's resident memory, tree_rss) or a callable giving the
    bytes in use now, or the bytes of each named part ({"aggregator": ..., "worker-1":
    ...}: process trees, containers), whose sum is the figure.
    """

    def __init__(
        self, source: int | Callable[[], int | Mapping[str, int]], every: float = 0.5
    ) -> None:
        super().__init__(daemon=True)
        self.sample = (lambda: tree_rss(source)) if isinstance(source, int) else source
        self.every = every
        self.last = self.peak = 0
        self.parts: dict[str, int] = {}  # the last sample's parts, when the source names them
        self._done = threading.Event()

    def run(self) -> None:
        while True:
            got = self.sample()
            if isinstance(got, Mapping):
                self.parts = dict(got)
                got = sum(self.parts.values())
            self.last = got
            self.peak = max(self.peak, self.last)
            if self._done.wait(self.every):
                return

    def __enter__(self) -> PeakMemory:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self.join()
