"""Processes: free ports, process groups, memory and CPU from /proc, peak sampling.

They live in fedsim.experiment.procs, which the experiment runner uses too.
"""

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
    "children",
    "cpu_seconds",
    "free_port",
    "start",
    "stop",
    "tree_rss",
    "vm_hwm_kib",
]
