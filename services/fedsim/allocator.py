"""Which malloc a process runs under. The images preload one (Debian's packages): jemalloc
in the aggregator's, tcmalloc in the client's (the workers).

Under glibc's malloc, threads that receive, decode or train on multi-megabyte
arrays leave per-thread arenas fragmented and never given back: over W2's cnn
rounds the aggregator grew 100-170 MiB (flat under jemalloc), and a TensorFlow
worker held about 100 MiB more than under either. For TensorFlow's training
steps jemalloc was 15% slower than glibc's malloc here, tcmalloc a few percent
faster (docs/benchmarks.md, W2).
"""

from __future__ import annotations

from pathlib import Path

JEMALLOC = "jemalloc"  # the aggregator's
TCMALLOC = "tcmalloc_minimal"  # the workers'


def name(maps: Path = Path("/proc/self/maps")) -> str:
    """jemalloc or tcmalloc where one is mapped into this process (preloaded), else glibc's."""
    try:
        text = maps.read_text()
    except OSError:
        return "unknown (no /proc)"
    for library, called in (("/libjemalloc", "jemalloc"), ("/libtcmalloc", "tcmalloc")):
        if library in text:
            return called
    return "glibc malloc"


def preloaded(env: dict[str, str], library: str) -> dict[str, str]:
    """`env` with `library` (JEMALLOC, TCMALLOC) preloaded when the system has it and `env`
    preloads nothing else: the images' allocators, for the processes the experiment
    runner starts itself."""
    import ctypes.util

    found = None if env.get("LD_PRELOAD") else ctypes.util.find_library(library)
    return {**env, "LD_PRELOAD": found} if found else env
