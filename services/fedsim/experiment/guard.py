"""The load check and the figures' marks: a benchmark measures alone or says it did not.

Timings on a shared machine stretch with what else runs, so a benchmark reads
the 1-minute load average before it starts and refuses above LOAD_LIMIT. With
`--force` it runs anyway, and every figure it prints or writes carries the load
it was taken under and `"loaded": true`. Every JSON output carries the load at
its start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOAD_LIMIT = 1.0  # 1-minute load average above which a benchmark refuses to start


def add_arguments(parser: argparse.ArgumentParser, *, json_help: str = "") -> None:
    """The options every benchmark takes: --force and --json."""
    parser.add_argument(
        "--force",
        action="store_true",
        help=f"run even above a 1-minute load of {LOAD_LIMIT:g}; every figure is marked loaded",
    )
    parser.add_argument("--json", type=Path, help=json_help or "also write the results here")


class Bench:
    """One benchmark's session: the load check at its start, the marks, the JSON at its end.

    load_start > limit refuses (SystemExit with one line) unless forced;
    loaded = forced and load_start > limit.
    """

    def __init__(
        self,
        name: str,
        *,
        force: bool = False,
        json_path: Path | None = None,
        limit: float = LOAD_LIMIT,
        loadavg: Callable[[], tuple[float, float, float]] | None = None,
    ) -> None:
        self.name, self.force, self.json_path, self.limit = name, force, json_path, limit
        self._loadavg = loadavg or os.getloadavg
        self.load_start = self.load()
        self.loaded = self.load_start > limit
        if self.loaded and not force:
            raise SystemExit(
                f"{name}: the 1-minute load is {self.load_start:.2f}, above {limit:g}: "
                "wait until the machine is idle, or pass --force (figures marked loaded)"
            )

    @classmethod
    def from_args(cls, name: str, args: argparse.Namespace, **kwargs: Any) -> Bench:
        return cls(name, force=args.force, json_path=args.json, **kwargs)

    def load(self) -> float:
        """The 1-minute load average now, to two decimals."""
        return round(self._loadavg()[0], 2)

    def figure(self, values: dict[str, Any], load: float | None = None) -> dict[str, Any]:
        """`values` with the load they were taken under (now, unless given) and `loaded`."""
        return {**values, "load": self.load() if load is None else load, "loaded": self.loaded}

    def mark(self, line: str, load: float | None = None) -> str:
        """A printed figure: unchanged, or with its load when taken under a refused load."""
        if not self.loaded:
            return line
        return f"{line}  [loaded: load {self.load() if load is None else load:.2f}]"

    def say(self, line: str, load: float | None = None) -> None:
        print(self.mark(line, load), flush=True)

    def mark_table(self) -> None:
        """Under a table (whose rows cannot carry a mark): one line when its figures are loaded."""
        if self.loaded:
            print(f"[loaded: the figures above were taken from load {self.load_start:.2f}]")

    def command(self) -> list[str]:
        """The command line as run from the project's folder."""
        return [f"scripts/{Path(sys.argv[0]).name}", *sys.argv[1:]]

    def header(self) -> None:
        """The command and the machine, and a warning line when forced above the limit."""
        print(f"command: {' '.join(self.command())}")
        print(f"machine: {os.cpu_count()} cores, load {self.load_start:.2f}", flush=True)
        if self.loaded:
            print(
                f"loaded: started at load {self.load_start:.2f} above {self.limit:g} (--force); "
                "these figures are not comparable with unloaded ones",
                flush=True,
            )

    def document(self, results: Any) -> dict[str, Any]:
        """The JSON output: the results with the command and the load at start and end."""
        return {
            "benchmark": self.name,
            "command": self.command(),
            "cpus": os.cpu_count(),
            "load_start": self.load_start,
            "load_end": self.load(),
            "load_limit": self.limit,
            "forced": self.force,
            "loaded": self.loaded,
            "results": results,
        }

    def finish(self, results: Any) -> dict[str, Any]:
        """Write the JSON output to --json, when given; the document either way."""
        doc = self.document(results)
        if self.json_path is not None:
            self.json_path.write_text(json.dumps(doc, indent=2) + "\n")
        return doc
