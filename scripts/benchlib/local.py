"""Whole local runs: scripts/simulate.sh (prepare, the aggregator, N workers) in a temporary folder.

Each run gets its own MODEL_DIR, TOKENS_FILE and port; settings not given keep
the code's defaults (no .env is read). Also: where MNIST is, the run's history
as it grows, and another benchmark run as a child for its JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fedsim.experiment.local import read_history  # one per version; a torn line skipped

from .procs import PeakMemory, free_port, start, stop

__all__ = ["ROOT", "LocalRun", "child_json", "data_dir", "local_run", "read_history", "run_env"]

ROOT = Path(__file__).resolve().parent.parent.parent


def data_dir() -> str:
    """The folder holding the MNIST files: DATA_DIR, FEDSIM_TEST_MNIST, ./data or ../shared/mnist."""
    for candidate in (
        os.environ.get("DATA_DIR"),
        os.environ.get("FEDSIM_TEST_MNIST"),
        ROOT / "data",
        ROOT.parent / "shared" / "mnist",
    ):
        if candidate and (Path(candidate) / "t10k-labels-idx1-ubyte.gz").is_file():
            return str(candidate)
    sys.exit(f"{Path(sys.argv[0]).stem}: no MNIST files found; set DATA_DIR")


def run_env(tmp: Path, overrides: dict[str, str]) -> dict[str, str]:
    """The environment of a run in `tmp`: the code's defaults, a free port, then `overrides`."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp),
        "FEDSIM_ENV_FILE": str(tmp / "no.env"),
        "DATA_DIR": data_dir(),
        "MODEL_DIR": str(tmp / "models"),
        "TOKENS_FILE": str(tmp / "tokens.json"),
        "AGGREGATOR_URL": f"http://127.0.0.1:{free_port()}",
        **overrides,
    }


@dataclass
class LocalRun:
    """A started run: its process (simulate.sh's group), environment, log and memory."""

    proc: subprocess.Popen
    env: dict[str, str]
    log: Path
    memory: PeakMemory
    started: float

    @property
    def model_dir(self) -> Path:
        return Path(self.env["MODEL_DIR"])

    def history(self) -> list[dict]:
        return read_history(self.model_dir / "history.jsonl")

    def seconds(self) -> float:
        return round(time.monotonic() - self.started, 1)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def local_run(
    overrides: dict[str, str], workers: int, *, prefix: str, every: float = 0.5
) -> Iterator[LocalRun]:
    """`scripts/simulate.sh --clients workers` with `overrides`, its memory sampled every
    `every` s; stopped (the whole group) and its folder removed when the block ends."""
    with tempfile.TemporaryDirectory(prefix=prefix) as name:
        tmp = Path(name)
        env = run_env(tmp, overrides)
        log = tmp / "run.log"
        started = time.monotonic()
        proc = start(
            [ROOT / "scripts" / "simulate.sh", "--clients", str(workers)], env=env, log=log
        )
        with PeakMemory(proc.pid, every) as memory:
            try:
                yield LocalRun(proc, env, log, memory, started)
            finally:
                stop(proc)


def python() -> str:
    """The project's Python (.venv), else this one."""
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv if venv.exists() else sys.executable)


def child_json(script: str, *args: str) -> dict:
    """Another benchmark in its own process; the JSON document it prints last."""
    done = subprocess.run(
        [python(), str(ROOT / "scripts" / script), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{Path(sys.argv[0]).stem}: {script} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
