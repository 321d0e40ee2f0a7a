"""What the Docker tests share (Compose in test_docker.py, Swarm in test_swarm.py): a copy
of the project in a temporary folder, its MNIST files, a free port, a worker's summary,
the reset and what a project leaves behind after it.

The project copy and the reset command are the Docker benchmarks' too (scripts/benchlib).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedsim import config
from helpers.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from benchlib.docker import COMPOSE_RESET, copy_project  # noqa: E402

__all__ = ["COMPOSE_RESET", "copy_project", "free_port"]

IN_CI = os.environ.get("CI", "").lower() == "true"
MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def add_mnist(folder: Path, mnist_dir: Path) -> None:
    for name in MNIST_FILES:
        shutil.copyfile(mnist_dir / name, folder / "data" / name)


def docker_info(fmt: str = "{{.ServerVersion}}") -> str:
    """`docker info --format fmt`. Without an engine the test skips, or fails under CI=true."""
    try:
        info = subprocess.run(
            ["docker", "info", "--format", fmt],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        reason = info.stderr.strip().splitlines()[-1:] if info.returncode else None
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason = [str(exc)]
    if reason is not None:
        message = f"no Docker engine (`docker info` failed: {' '.join(reason)})"
        if IN_CI:
            pytest.fail(message + "; CI=true requires one (run ../shared/tools/docker-sandbox up)")
        pytest.skip(message)
    return info.stdout


def clean_env(extra_keys: Iterable[str] = ()) -> dict[str, str]:
    """The caller's environment without fedsim or Compose settings (and `extra_keys`),
    which would override the test's `.env` (the shell takes precedence)."""
    return config.without_settings(extra=set(extra_keys))


class ProjectCopy:
    """A copy of the project in its own folder, with its own name, host port and `.env`;
    `name_key` is the setting that names it (the Compose project, the stack)."""

    name_key = "COMPOSE_PROJECT_NAME"
    name_prefix = "fedsim-test-"
    extra_keys: frozenset[str] = frozenset()  # settings of the shell to leave out too

    def __init__(self, folder: Path, settings: dict[str, str]) -> None:
        self.folder = folder
        self.name = f"{self.name_prefix}{secrets.token_hex(4)}"
        self.port = free_port()
        self.settings = settings
        copy_project(folder)
        self.write_env(settings)

    def write_env(self, settings: dict[str, str]) -> None:
        lines = [f"{self.name_key}={self.name}", f"AGGREGATOR_PORT={self.port}"]
        lines += [f'{key}="{value}"' for key, value in settings.items()]
        (self.folder / ".env").write_text("\n".join(lines) + "\n")

    def add_mnist(self, mnist_dir: Path) -> None:
        add_mnist(self.folder, mnist_dir)

    def run(
        self, *args: str, check: bool = True, timeout: float = 900
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the project folder; stdout and stderr together."""
        done = subprocess.run(
            args,
            cwd=self.folder,
            env=clean_env(self.extra_keys),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}")
        return done


def leftovers(label: str) -> dict[str, list[str]]:
    """The containers (running or not), networks and volumes carrying `label`
    (e.g. com.docker.compose.project=NAME); empty lists when all are gone."""
    found = {}
    for kind, command in (
        ("containers", ["ps", "-a"]),
        ("networks", ["network", "ls"]),
        ("volumes", ["volume", "ls"]),
    ):
        done = subprocess.run(
            ["docker", *command, "-q", "--filter", f"label={label}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        found[kind] = done.stdout.split()
    return found


def evaluation_report(output: str, folder: Path) -> tuple[float, dict]:
    """The accuracy an evaluation printed, and the one report it wrote in folder/reports,
    which says the same."""
    accuracy = float(re.search(r"^accuracy: (\d\.\d+)$", output, re.M).group(1))
    reports = list((folder / "reports").glob("evaluation-*.json"))
    assert len(reports) == 1, output
    report = json.loads(reports[0].read_text())
    assert abs(report["accuracy"] - accuracy) < 1e-4, (report, output)
    return accuracy, report


def worker_summary(worker_log: str) -> dict[str, int]:
    """The numbers of a worker's summary line."""
    match = re.search(
        r"done: (?P<trained>\d+) updates trained.*?, (?P<evaluations>\d+) evaluations?, pushes "
        r"(?P<accepted>\d+) accepted (?P<failed>\d+) failed (?P<refused>\d+) refused, "
        r"pulls \d+ failed, re-pushed (?P<repushed>\d+)",
        worker_log,
    )
    assert match, f"no summary line in:\n{worker_log}"
    return {key: int(value) for key, value in match.groupdict().items()}


def projects(tmp_path: Path, make_one: Callable[[Path, dict[str, str]], Any]) -> Iterator:
    """A fixture body: yields a factory of projects, each in its own folder, and takes
    them down afterwards (unless FEDSIM_TEST_KEEP is set, to look at them)."""
    made: list[Any] = []

    def make(settings: dict[str, str]) -> Any:
        folder = tmp_path / f"project-{len(made)}"
        folder.mkdir()
        made.append(make_one(folder, settings))
        return made[-1]

    yield make
    if not os.environ.get("FEDSIM_TEST_KEEP"):
        for project in made:
            project.down()
