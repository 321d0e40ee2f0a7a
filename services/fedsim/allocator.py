"""Which malloc a process runs under. Both images preload jemalloc (Debian's libjemalloc2).

Under glibc's malloc, threads that receive, decode or train on multi-megabyte
arrays leave per-thread arenas fragmented and never given back: over W2's cnn
rounds the aggregator grew 100-170 MiB, and a TensorFlow worker held about
100 MiB more than under jemalloc (docs/benchmarks.md, W2).
"""

from __future__ import annotations

from pathlib import Path


def name(maps: Path = Path("/proc/self/maps")) -> str:
    """jemalloc where it is mapped into this process (preloaded), else glibc's malloc."""
    try:
        return "jemalloc" if "/libjemalloc" in maps.read_text() else "glibc malloc"
    except OSError:
        return "unknown (no /proc)"


def preloaded(env: dict[str, str]) -> dict[str, str]:
    """`env` with jemalloc preloaded when the system has it and `env` preloads nothing else:
    the images' allocator, for the processes the experiment runner starts itself."""
    import ctypes.util

    library = None if env.get("LD_PRELOAD") else ctypes.util.find_library("jemalloc")
    return {**env, "LD_PRELOAD": library} if library else env
