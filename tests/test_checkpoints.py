"""Checkpoints: atomic writes, `latest`, pruning, and resume past a corrupt file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fedsim import checkpoints


def tensors(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((4,), value, np.float32)}


def test_save_then_load_newest(tmp_path: Path) -> None:
    for version in (0, 1, 2):
        checkpoints.save(tmp_path, version, tensors(version), {"samples": version * 10}, keep=5)
    ckpt = checkpoints.load_newest(tmp_path)
    assert ckpt is not None
    assert ckpt.version == 2
    assert ckpt.metadata["samples"] == "20"
    np.testing.assert_array_equal(ckpt.tensors["w"], tensors(2)["w"])
    assert (tmp_path / "latest").read_text() == "ckpt-2.safetensors\n"


def test_versions_sort_numerically_and_keep_prunes(tmp_path: Path) -> None:
    for version in (1, 2, 9, 10, 11):
        checkpoints.save(tmp_path, version, tensors(version), {}, keep=3)
    assert checkpoints.versions(tmp_path) == [11, 10, 9]
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == [
        "ckpt-10.safetensors",
        "ckpt-11.safetensors",
        "ckpt-9.safetensors",
    ]


def test_no_checkpoint(tmp_path: Path) -> None:
    assert checkpoints.load_newest(tmp_path) is None
    assert checkpoints.load_newest(tmp_path / "absent") is None


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "nan", "wrong-version"])
def test_corrupt_newest_is_skipped_with_a_warning(tmp_path: Path, damage: str, caplog) -> None:
    checkpoints.save(tmp_path, 1, tensors(1), {}, keep=5)
    newest = checkpoints.save(tmp_path, 2, tensors(2), {}, keep=5)
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        newest.write_bytes(b"\x00" * len(data))
    elif damage == "empty":
        newest.write_bytes(b"")
    elif damage == "nan":
        checkpoints.save(tmp_path, 2, {"w": np.full((4,), np.nan, np.float32)}, {}, keep=5)
    else:
        checkpoints.save(tmp_path, 3, tensors(3), {}, keep=5)
        (tmp_path / "ckpt-3.safetensors").rename(newest)
    ckpt = checkpoints.load_newest(tmp_path)
    assert ckpt is not None and ckpt.version == 1
    assert "skipping checkpoint" in caplog.text and "ckpt-2.safetensors" in caplog.text


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoints.save(tmp_path, 1, tensors(1), {}, keep=5)

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save(tmp_path, 2, tensors(2), {}, keep=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-1.safetensors", "latest"]
    ckpt = checkpoints.load_newest(tmp_path)
    assert ckpt is not None and ckpt.version == 1
