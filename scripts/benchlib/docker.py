"""What the Compose and Swarm benchmarks and tests share: the reset, a copy of the project,
a clean environment, the API's status.

The reset is the documented one: every profile's containers (the `monitoring`
profile's Prometheus too), the networks and the volumes.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

from fedsim import config

ROOT = Path(__file__).resolve().parent.parent.parent
COMPOSE_RESET = ("--profile", "*", "down", "-v", "--remove-orphans")
MNIST_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without fedsim, Compose or Swarm settings (the shell beats
    `.env` in Compose), so the code's defaults apply; then `extra`."""
    return config.without_settings() | extra


def mnist_files(folder: Path) -> dict[str, Path | None]:
    """Each MNIST file's path in `folder` (plain or gzipped), None when missing."""
    return {n: next(iter(sorted(folder.glob(n + "*"))), None) for n in MNIST_NAMES}


def status(port: int) -> dict | None:
    """GET /v1/status on 127.0.0.1:port; None while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=2) as r:
            return json.load(r)
    except OSError:
        return None


# What a copy of the project needs to build and run: the build inputs, compose.yaml,
# the scripts and deploy/.
PROJECT_FILES = ("compose.yaml", ".dockerignore", "pyproject.toml", "services", "scripts", "deploy")


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
