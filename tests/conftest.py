"""Fixtures shared by every test: real MNIST from ../shared/mnist, settings, temp folders,
and the aggregator app in this process on a fake clock."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from fedsim import config

if TYPE_CHECKING:  # the app is imported by the tests that use it, not by every test
    from flask import Flask
    from flask.testing import FlaskClient

    from helpers import FakeClock

ROOT = Path(__file__).resolve().parent.parent
# Tests and CI use the copy beside the project; FEDSIM_TEST_MNIST points elsewhere.
MNIST_DIR = Path(os.environ.get("FEDSIM_TEST_MNIST", ROOT.parent / "shared" / "mnist"))


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not all(
        (MNIST_DIR / f"{n}.gz").is_file()
        for n in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
    ):
        pytest.skip(f"MNIST files not found in {MNIST_DIR} (set FEDSIM_TEST_MNIST)")
    return MNIST_DIR


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., config.Settings]:
    """Settings from defaults plus overrides, with MODEL_DIR in a fresh temp folder.

    No `.env` is read and the process environment is ignored, so tests are
    independent of the machine they run on.
    """

    def make(**overrides: object) -> config.Settings:
        environ = {
            "MODEL_DIR": str(tmp_path / "models"),
            "DATA_DIR": str(MNIST_DIR),
            "TOKENS_FILE": str(tmp_path / "secrets" / "tokens.json"),
            "WORKER_STATE_DIR": str(tmp_path / "worker-state"),
        }
        environ.update({k: str(v) for k, v in overrides.items()})
        return config.load(environ=environ, env_file=tmp_path / "no.env")

    return make


@pytest.fixture
def clock() -> FakeClock:
    from helpers import FakeClock

    return FakeClock()


@pytest.fixture
def make_app(make_settings, clock) -> Callable[..., Flask]:
    """An app on a fresh MODEL_DIR holding version 0 (all zeros), unless write=False;
    overrides are settings, e.g. make_app(SAVE_MODEL=1)."""
    from helpers import build_app

    return functools.partial(build_app, make_settings, clock)


@pytest.fixture
def app(make_app) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()
