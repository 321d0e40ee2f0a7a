"""Processes: free ports, process groups, memory and CPU from /proc, peak sampling.

They live in fedsim.experiment.procs, which the experiment runner uses too; `allocator`
names the malloc a profile runs under.
"""

import os

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
    "start",
    "stop",
    "tree_rss",
    "vm_hwm_kib",
]


def allocator() -> str:
    """The allocator this process and its children run under, as the environment sets it."""
    preload = os.environ.get("LD_PRELOAD", "")
    arenas = os.environ.get("MALLOC_ARENA_MAX")
    if preload:
        return f"LD_PRELOAD={preload}"
    return f"glibc malloc{f', MALLOC_ARENA_MAX={arenas}' if arenas else ''}"
