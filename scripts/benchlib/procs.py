"""Processes: free ports, process groups, memory and CPU from /proc, peak sampling.

They live in fedsim.experiment.procs, which the experiment runner uses too; `allocator`
names the malloc a profile runs under, `rss_bytes` a process's resident memory now.
"""

import os
from pathlib import Path

from fedsim.experiment.procs import (
    PeakMemory,
    children,
    cpu_seconds,
    free_port,
    start,
    stop,
    tree_rss,
    vm_hwm_kib,
)

__all__ = [
    "PeakMemory",
    "allocator",
    "children",
    "cpu_seconds",
    "free_port",
    "rss_bytes",
    "start",
    "stop",
    "tree_rss",
    "vm_hwm_kib",
]


def allocator() -> str:
    """The allocator this process and its children run under, as the environment sets it."""
    preload = os.environ.get("LD_PRELOAD", "")
    arenas = os.environ.get("MALLOC_ARENA_MAX")
    # the allocators' own settings: jemalloc's MALLOC_CONF, tcmalloc's TCMALLOC_*
    tuned = [f"{k}={v}" for k, v in sorted(os.environ.items())
             if v and (k == "MALLOC_CONF" or k.startswith("TCMALLOC_"))]  # fmt: skip
    if preload:
        return " ".join([f"LD_PRELOAD={preload}", *tuned])
    return f"glibc malloc{f', MALLOC_ARENA_MAX={arenas}' if arenas else ''}"


def rss_bytes(pid: int | str = "self") -> int:
    """A process's resident memory now (VmRSS); 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
