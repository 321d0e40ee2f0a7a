"""Which malloc a process runs under, and the runner preloading jemalloc as the images do."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

from fedsim import allocator


def test_the_allocator_is_read_from_what_the_process_has_mapped(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text("7f3c r-xp 00000000 08:01 42 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert allocator.name(maps) == "jemalloc"
    maps.write_text("7f3c r-xp 00000000 08:01 42 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert allocator.name(maps) == "glibc malloc"
    assert allocator.name(tmp_path / "absent") == "unknown (no /proc)"


def test_jemalloc_is_preloaded_where_the_system_has_it(monkeypatch) -> None:
    found = ctypes.util.find_library("jemalloc")
    if found:  # a real process under it says so (the images' case; CI installs it)
        said = subprocess.run(
            [sys.executable, "-c", "from fedsim import allocator; print(allocator.name())"],
            env=allocator.preloaded(dict(os.environ)), capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert said.stdout.strip() == "jemalloc", said
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libjemalloc.so.2")
    assert allocator.preloaded({"A": "1"}) == {"A": "1", "LD_PRELOAD": "libjemalloc.so.2"}
    assert allocator.preloaded({"LD_PRELOAD": "libtcmalloc.so.4"}) == {
        "LD_PRELOAD": "libtcmalloc.so.4"
    }
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert allocator.preloaded({"A": "1"}) == {"A": "1"}
