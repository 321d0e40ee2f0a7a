"""Which malloc a process runs under, and the runner preloading jemalloc as the images do."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim import allocator


def test_the_allocator_is_read_from_what_the_process_has_mapped(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text("7f3c r-xp 00000000 08:01 42 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert allocator.name(maps) == "jemalloc"
    maps.write_text("7f3c r-xp 00000000 08:01 42 /usr/lib/libtcmalloc_minimal.so.4.5.10\n")
    assert allocator.name(maps) == "tcmalloc"
    maps.write_text("7f3c r-xp 00000000 08:01 42 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert allocator.name(maps) == "glibc malloc"
    assert allocator.name(tmp_path / "absent") == "unknown (no /proc)"


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
    assert allocator.preloaded({"A": "1"}, library) == {"A": "1", "LD_PRELOAD": f"lib{library}.so"}
    assert allocator.preloaded({"LD_PRELOAD": "libother.so"}, library) == {
        "LD_PRELOAD": "libother.so"
    }
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert allocator.preloaded({"A": "1"}, library) == {"A": "1"}
