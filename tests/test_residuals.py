"""Error feedback's residual files (pipeline/residuals.py): what is read back for a task, and
what is ignored with a warning line (another run, another client, a later version, corrupt)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from fedsim import models, weights
from fedsim.pipeline.residuals import Residuals

LAYOUT = models.SHAPES["mlp"]


def residual(fill: float) -> dict[str, np.ndarray]:
    return {n: np.full(s, fill, np.float32) for n, s in LAYOUT}


def sent() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {n: (np.array([0], np.int32), np.array([2.0], np.float32)) for n, _ in LAYOUT}


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """client-3's residual (all 0.25) after task r2.c3 from version 4 of run 'ab'."""
    Residuals(tmp_path).save("client-3", "ab", "r2.c3", 4, residual(0.25), sent())
    return tmp_path


def test_another_task_of_the_client_gets_the_residual(saved: Path) -> None:
    got = Residuals(saved).load("client-3", "ab", "r3.c3", 5, LAYOUT)
    assert got is not None
    assert all(np.array_equal(got[n], residual(0.25)[n]) for n, _ in LAYOUT)


def test_the_same_task_again_gets_the_residual_and_what_it_sent(saved: Path) -> None:
    got = Residuals(saved).load("client-3", "ab", "r2.c3", 4, LAYOUT)
    assert got is not None
    for name, _ in LAYOUT:
        assert got[name].ravel()[0] == 2.25 and (got[name].ravel()[1:] == 0.25).all()


def test_the_file_is_written_whole_with_its_tags(saved: Path) -> None:
    (path,) = saved.iterdir()
    assert path.name == "client-3.safetensors"
    tensors, meta = weights.decode(path.read_bytes(), dtypes=("F32", "I32"))
    assert meta == {
        "format": "fedsim-residual-1",
        "run": "ab",
        "client": "client-3",
        "task": "r2.c3",
        "base_version": "4",
    }
    assert {f"e/{n}" for n, _ in LAYOUT} <= set(tensors)


def corrupt(path: Path) -> None:
    path.write_bytes(b"\x00" * 40)


def renamed(path: Path) -> None:
    path.rename(path.with_name("client-4.safetensors"))


@pytest.mark.parametrize(
    ("how", "client", "run", "version", "warning"),
    [
        (None, "client-3", "cd", 5, "is of another run"),
        (None, "client-3", "ab", 3, "follows version '4', later than this task's 3"),
        (renamed, "client-4", "ab", 5, "belongs to 'client-3'"),
        (corrupt, "client-3", "ab", 5, "is corrupt"),
    ],
    ids=["other-run", "later-version", "other-client", "corrupt"],
)
def test_a_foreign_or_corrupt_file_is_ignored_with_a_warning(
    saved: Path, caplog, how, client, run, version, warning
) -> None:
    if how is not None:
        how(saved / "client-3.safetensors")
    with caplog.at_level(logging.WARNING, logger="fedsim.pipeline"):
        assert Residuals(saved).load(client, run, "r9.c3", version, LAYOUT) is None
    assert warning in caplog.text and f"{client} starts from 0" in caplog.text


def test_a_file_of_another_model_is_ignored(saved: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="fedsim.pipeline"):
        assert Residuals(saved).load("client-3", "ab", "r3.c3", 5, models.SHAPES["cnn"]) is None
    assert "does not fit the model" in caplog.text


def test_no_file_is_a_zero_residual_without_a_warning(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="fedsim.pipeline"):
        assert Residuals(tmp_path).load("client-1", "ab", "r1.c1", 0, LAYOUT) is None
    assert not caplog.text


def test_an_unwritable_folder_keeps_the_residual_in_memory(tmp_path: Path, caplog) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    store = Residuals(blocked / "state")
    with caplog.at_level(logging.WARNING, logger="fedsim.pipeline"):
        store.save("client-1", "ab", "r1.c1", 0, residual(0.5), sent())
    assert "cannot be written" in caplog.text
    got = store.load("client-1", "ab", "r2.c1", 1, LAYOUT)
    assert got is not None and float(got["output/bias"][0]) == 0.5


def test_without_a_folder_the_residual_stays_in_this_worker(tmp_path: Path) -> None:
    store = Residuals(None)
    store.save("client-1", "ab", "r1.c1", 0, residual(0.5), sent())
    assert store.load("client-1", "ab", "r2.c1", 1, LAYOUT) is not None
    assert not list(tmp_path.iterdir())
