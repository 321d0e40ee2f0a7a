"""The one harness of the benchmarks in scripts/: each benchmark keeps only its workload.

- guard: the load check (refuse above a 1-minute load of 1.0 unless --force),
  the figures' load marks, the JSON output;
- procs: free ports, process groups, memory and CPU from /proc, peak sampling
  (fedsim.experiment.procs, shared with the experiment runner);
- serve: a stand-in aggregator under gunicorn, and uploaders (needs fedsim);
- docker: the Compose and Swarm benchmarks' environment, reset and status.

The benchmarks run as `.venv/bin/python scripts/bench_x.py`, which puts scripts/ on the
path; they need fedsim installed. Sweeps of whole runs over settings and seeds are
experiment files instead (experiments/, docs/experiments.md).
"""

from pathlib import Path

from .guard import LOAD_LIMIT, Bench, add_arguments
from .procs import (
    PeakMemory,
    allocator,
    cpu_seconds,
    free_port,
    rss_bytes,
    start,
    stop,
    tree_rss,
    vm_hwm_kib,
)

ROOT = Path(__file__).resolve().parent.parent.parent  # the project's folder

__all__ = [
    "LOAD_LIMIT",
    "ROOT",
    "Bench",
    "PeakMemory",
    "add_arguments",
    "allocator",
    "cpu_seconds",
    "free_port",
    "rss_bytes",
    "start",
    "stop",
    "tree_rss",
    "vm_hwm_kib",
]
