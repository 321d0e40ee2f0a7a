"""Which malloc a process runs under, and the runner preloading jemalloc as the images do."""

from __future__ import annotations

import ctypes.util
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim import allocator

PACKAGES = {allocator.JEMALLOC: "libjemalloc2", allocator.TCMALLOC: "libtcmalloc-minimal4"}


def without_preload() -> dict[str, str]:
    """This process's environment without a preloaded malloc or jemalloc's settings."""
    return {k: v for k, v in os.environ.items() if k not in ("MALLOC_CONF", "LD_PRELOAD")}


def require(library: str) -> None:
    """Skip where `library` is not installed; fail under CI, which installs it (.ci/run)."""
    if ctypes.util.find_library(library):
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI installs {PACKAGES[library]} (.ci/run), but it is not found")
    pytest.skip(f"{PACKAGES[library]} is not installed (apt-get install {PACKAGES[library]})")


def test_the_allocator_is_read_from_what_the_process_has_mapped(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text("7f3c r-xp 00000000 08:01 42 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert allocator.name(maps) == "jemalloc"
    maps.write_text("7f3c r-xp 00000000 08:01 42 /usr/lib/libtcmalloc_minimal.so.4.5.10\n")
    assert allocator.name(maps) == "tcmalloc"
    maps.write_text("7f3c r-xp 00000000 08:01 42 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert allocator.name(maps) == "glibc malloc"
    assert allocator.name(tmp_path / "absent") == "unknown (no /proc)"


def test_the_log_names_jemallocs_conf_beside_it(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text("7f3c r-xp 00000000 08:01 42 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    conf = {"MALLOC_CONF": "narenas:1"}
    assert allocator.described(maps, conf) == "jemalloc (MALLOC_CONF=narenas:1)"
    assert allocator.described(maps, {}) == "jemalloc"
    maps.write_text("7f3c r-xp 00000000 08:01 42 /usr/lib/libtcmalloc_minimal.so.4.5.10\n")
    assert allocator.described(maps, conf) == "tcmalloc"  # jemalloc's setting, not tcmalloc's


@pytest.mark.parametrize(
    ("library", "called"), [(allocator.JEMALLOC, "jemalloc"), (allocator.TCMALLOC, "tcmalloc")]
)
def test_an_allocator_is_preloaded_where_the_system_has_it(monkeypatch, library, called) -> None:
    found = ctypes.util.find_library(library)
    if found:  # a real process under it says so (the images' case; CI installs both)
        said = subprocess.run(
            [sys.executable, "-c", "from fedsim import allocator; print(allocator.name())"],
            env=allocator.preloaded(dict(os.environ), library),
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert said.stdout.strip() == called, said
    elif os.environ.get("CI") == "true":
        pytest.fail(f"CI installs lib{library} (.ci/run), but it is not found")
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: f"lib{name}.so")
    conf = {"MALLOC_CONF": allocator.JEMALLOC_CONF} if library == allocator.JEMALLOC else {}
    assert allocator.preloaded({"A": "1"}, library) == {
        "A": "1", "LD_PRELOAD": f"lib{library}.so", **conf
    }  # fmt: skip
    assert allocator.preloaded({"MALLOC_CONF": "narenas:4"}, library) == {
        "MALLOC_CONF": "narenas:4", "LD_PRELOAD": f"lib{library}.so"
    }  # fmt: skip
    assert allocator.preloaded({"LD_PRELOAD": "libother.so"}, library) == {
        "LD_PRELOAD": "libother.so"
    }
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert allocator.preloaded({"A": "1"}, library) == {"A": "1"}


# jemalloc's own count of its arenas (mallctl "opt.narenas"), read in a process under it
NARENAS = """
import ctypes
n, size = ctypes.c_uint(), ctypes.c_size_t(ctypes.sizeof(ctypes.c_uint))
lib = ctypes.CDLL(None)
assert lib.mallctl(b"opt.narenas", ctypes.byref(n), ctypes.byref(size), None, 0) == 0
print(n.value)
"""


def test_the_aggregator_runs_jemalloc_with_one_arena_as_its_image_does() -> None:
    dockerfile = (Path(__file__).parents[1] / "services/aggregator/Dockerfile").read_text()
    assert f"ENV MALLOC_CONF={allocator.JEMALLOC_CONF}\n" in dockerfile
    require(allocator.JEMALLOC)
    plain = without_preload()

    def arenas(env: dict[str, str]) -> str:
        said = subprocess.run([sys.executable, "-c", NARENAS], env=env, capture_output=True,
                              text=True, check=True)  # fmt: skip
        return said.stdout.strip()

    assert arenas(allocator.preloaded(plain, allocator.JEMALLOC)) == "1"
    # A MALLOC_CONF of the environment's own is kept, and jemalloc reads it.
    assert (
        arenas(allocator.preloaded({**plain, "MALLOC_CONF": "narenas:3"}, allocator.JEMALLOC))
        == "3"
    )


# A process that frees half of 64 MiB it wrote in blocks of 64 KiB (below glibc's mmap
# threshold, so only malloc_trim gives them back there), then asks its allocator to give
# the free pages back: which call did, how much resident memory that gave back, and
# tcmalloc's own count of its free pages before and after.
RELEASE = """
import os, numpy
from fedsim import allocator
page = os.sysconf("SC_PAGE_SIZE")
def resident(): return int(open("/proc/self/statm").read().split()[1]) * page
blocks = [numpy.ones(1 << 16, numpy.uint8) for _ in range(1024)]
del blocks[::2]  # freed, between blocks still in use: kept by the allocator for reuse
before, held = resident(), allocator.held()
called = allocator.release()
after = allocator.held()
print(called, (before - resident()) >> 20, *(c and c["free"] >> 20 for c in (held, after)))
"""


@pytest.mark.parametrize(
    ("library", "call"),
    [(allocator.TCMALLOC, "MallocExtension_ReleaseFreeMemory"),
     (allocator.JEMALLOC, "mallctl(arena.4096.purge)"), (None, "malloc_trim(0)")],
)  # fmt: skip
def test_release_gives_the_allocators_free_pages_back(library, call) -> None:
    if library is None:
        if platform.libc_ver()[0] != "glibc":
            pytest.skip("the C library here is not glibc")
        env = without_preload()
    else:
        require(library)
        env = allocator.preloaded(without_preload(), library)
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    said = subprocess.run([sys.executable, "-c", RELEASE], env=env, capture_output=True,
                          text=True, check=True)  # fmt: skip
    called, given_back, held_before, held_after = said.stdout.split()
    assert called == call, said
    assert int(given_back) >= 16, said  # of the 32 MiB freed
    if library == allocator.TCMALLOC:  # its own count of the free pages it held, and after
        assert int(held_before) >= 16 and held_after == "0", said
    else:
        assert (held_before, held_after) == ("None", "None"), said


def test_release_does_nothing_and_says_so_where_it_knows_no_call(monkeypatch) -> None:
    allocator._releaser.cache_clear()
    monkeypatch.setattr(allocator, "name", lambda: "unknown (no /proc)")
    assert allocator.release() is None
    allocator._releaser.cache_clear()
    monkeypatch.setattr(allocator, "name", lambda: "glibc malloc")

    def no_symbols(name):  # as Windows' ctypes answers CDLL(None)
        raise TypeError("argument of type 'NoneType' is not iterable")

    monkeypatch.setattr(allocator.ctypes, "CDLL", no_symbols)
    assert allocator.release() is None
    assert allocator.held() is None
    allocator._releaser.cache_clear()
