"""What the Docker tests share (Compose in test_docker.py, Swarm in test_swarm.py): a copy
of the project in a temporary folder, its MNIST files, a free port, a worker's summary."""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"
# What a project copy needs: the build inputs, compose.yaml, the scripts and deploy/.
PROJECT_FILES = ("compose.yaml", ".dockerignore", "pyproject.toml", "services", "scripts", "deploy")
MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def copy_project(folder: Path) -> None:
    """The project's files into `folder`, with an empty ./data."""
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(
                source, folder / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
            )
        else:
            shutil.copy2(source, folder / name)
    (folder / "data").mkdir()


def add_mnist(folder: Path, mnist_dir: Path) -> None:
    for name in MNIST_FILES:
        shutil.copyfile(mnist_dir / name, folder / "data" / name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
