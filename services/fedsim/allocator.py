"""Which malloc a process runs under, and its free pages given back. The images preload
one (Debian's packages): jemalloc in the aggregator's, tcmalloc in the client's (the workers).

Under glibc's malloc, threads that receive, decode or train on multi-megabyte
arrays leave per-thread arenas fragmented and never given back: over W2's cnn
rounds the aggregator grew 100-170 MiB (flat under jemalloc), and a TensorFlow
worker held about 100 MiB more than under either. For TensorFlow's training
steps jemalloc was 15% slower than glibc's malloc here, tcmalloc a few percent
faster (docs/benchmarks.md, W2).

jemalloc runs with one arena (JEMALLOC_CONF): by default it gives each of gunicorn's
threads one of 4 x cores arenas, and each arena keeps the pages its threads freed
for reuse; with one, the pages a thread frees are the next thread's. On W2's cnn
rounds the aggregator's peak fell from 280-288 to 182-184 MiB and its resting memory
by about 80 MiB, at the same updates a second (docs/benchmarks.md, "W2"): most of
its allocations are made holding the GIL, one thread at a time, anyway.

A worker gives its allocator's free pages back (`release`) when an ask for work
comes back empty after work. tcmalloc keeps the pages a task freed for the next
one, and where no free run of them is long enough for a large array it maps more:
a W2 worker's resident memory climbed in steps of 10-15 MiB to about 750 MiB while
what it had allocated stayed level, and the reading from round 5 on was that
climb (docs/benchmarks.md, W2). Given back, the pages are mapped again by the next
task, so a worker's peak is the same; between rounds it holds what it uses.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path

JEMALLOC = "jemalloc"  # the aggregator's
JEMALLOC_CONF = "narenas:1"  # its MALLOC_CONF, in the aggregator's image too
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


def described(maps: Path = Path("/proc/self/maps"), env: Mapping[str, str] | None = None) -> str:
    """`name`, with jemalloc's MALLOC_CONF when it has one: what a process's log names."""
    called = name(maps)
    conf = (os.environ if env is None else env).get("MALLOC_CONF")
    return f"{called} (MALLOC_CONF={conf})" if called == "jemalloc" and conf else called


def preloaded(env: dict[str, str], library: str) -> dict[str, str]:
    """`env` with `library` (JEMALLOC, TCMALLOC) preloaded when the system has it and `env`
    preloads nothing else, and jemalloc's JEMALLOC_CONF unless `env` sets a MALLOC_CONF:
    the images' allocators, for the processes the experiment runner starts itself."""
    import ctypes.util

    found = None if env.get("LD_PRELOAD") else ctypes.util.find_library(library)
    if not found:
        return env
    tuned = library == JEMALLOC and not env.get("MALLOC_CONF")
    return {**env, "LD_PRELOAD": found, **({"MALLOC_CONF": JEMALLOC_CONF} if tuned else {})}


def release() -> str | None:
    """Give the free pages this process's malloc holds back to the system, and name the
    call that did (None: no call known for this malloc, or the call refused). A page
    given back is mapped again when next used, so this is for a pause in the work (a
    worker between rounds), not inside it. Never raises: it saves memory, nothing more."""
    call = _releaser()
    if call is None or not call():
        return None
    return call.__name__


# jemalloc's MALLCTL_ARENAS_ALL (jemalloc 5): "arena.4096.purge" purges every arena
_JEMALLOC_PURGE_ALL = b"arena.4096.purge"


def _symbols() -> ctypes.CDLL | None:
    """This process's own symbols (libc's, and a preloaded malloc's), where it has them."""
    try:
        return ctypes.CDLL(None)
    except (OSError, TypeError):  # TypeError: Windows' ctypes takes no None
        return None


@functools.cache
def _releaser() -> Callable[[], bool] | None:
    """The call that gives the free pages back, True when it did. Looked up once: the
    malloc a process runs under is fixed when it starts (LD_PRELOAD)."""
    called = name()
    process = _symbols() if called in ("tcmalloc", "jemalloc", "glibc malloc") else None
    if process is None:
        return None
    if called == "tcmalloc" and hasattr(process, "MallocExtension_ReleaseFreeMemory"):
        free = process.MallocExtension_ReleaseFreeMemory
        free.argtypes, free.restype = [], None

        def release_free_memory() -> bool:
            free()
            return True

        release_free_memory.__name__ = "MallocExtension_ReleaseFreeMemory"
        return release_free_memory
    if called == "jemalloc" and hasattr(process, "mallctl"):
        mallctl = process.mallctl
        pointer = ctypes.c_void_p
        mallctl.argtypes = [ctypes.c_char_p, pointer, pointer, pointer, ctypes.c_size_t]
        mallctl.restype = ctypes.c_int

        def purge() -> bool:
            return mallctl(_JEMALLOC_PURGE_ALL, None, None, None, 0) == 0  # 0: done

        purge.__name__ = "mallctl(arena.4096.purge)"
        return purge
    if called == "glibc malloc" and hasattr(process, "malloc_trim"):
        trim = process.malloc_trim
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int

        def trim_all() -> bool:
            trim(0)  # 1 when it gave memory back, 0 when there was none to give
            return True

        trim_all.__name__ = "malloc_trim(0)"
        return trim_all
    return None


# tcmalloc's own counts (MallocExtension_GetNumericProperty), by the names `held` gives them
_TCMALLOC_COUNTS = {
    "allocated": b"generic.current_allocated_bytes",  # in use by the program
    "heap": b"generic.heap_size",  # mapped from the system, given back or not
    "free": b"tcmalloc.pageheap_free_bytes",  # free pages it holds: what `release` gives back
    "given_back": b"tcmalloc.pageheap_unmapped_bytes",  # free pages given back
}


def held() -> dict[str, int] | None:
    """tcmalloc's own counts, in bytes: what the program has allocated, its heap, the free
    pages it holds and those it gave back; None under another allocator."""
    process = _symbols() if name() == "tcmalloc" else None
    get = getattr(process, "MallocExtension_GetNumericProperty", None)
    if get is None:
        return None
    get.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t)]
    get.restype = ctypes.c_int
    counts = {}
    for called, prop in _TCMALLOC_COUNTS.items():
        value = ctypes.c_size_t(0)
        if get(prop, ctypes.byref(value)):
            counts[called] = value.value
    return counts
