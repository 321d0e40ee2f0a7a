"""Checkpoints: atomic writes, `latest`, pruning, checksums, validation, resume past bad files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedsim import checkpoints, weights


def tensors(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((4,), value, np.float32)}


def write_raw(model_dir: Path, version: int, body: bytes) -> Path:
    """A checkpoint file with exactly these bytes (save() would refuse to write most of them)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoints.path_for(model_dir, version)
    path.write_bytes(body)
    return path


def write_unchecked(model_dir: Path, version: int, tens: dict, meta: dict) -> Path:
    """A checkpoint as an earlier version wrote it: no checksum, nothing checked."""
    return write_raw(model_dir, version, weights.encode(tens, {"version": version, **meta}))


def refused(path: Path, status: int, reason: str) -> None:
    with pytest.raises(weights.WeightsError) as info:
        checkpoints.read(path)
    assert info.value.status == status
    assert reason in info.value.reason, info.value.reason


def falls_back(model_dir: Path, bad: Path, caplog: pytest.LogCaptureFixture) -> None:
    """load_newest skips `bad` with a warning and returns the good version 1."""
    ckpt = checkpoints.load_newest(model_dir)
    assert ckpt is not None and ckpt.version == 1
    assert f"skipping checkpoint {bad}" in caplog.text


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A folder whose version 1 is good."""
    checkpoints.save(tmp_path, 1, tensors(1), {"samples": 10, "updates": 1}, keep=5)
    return tmp_path


# --- saving and loading -------------------------------------------------------------------


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


@pytest.mark.parametrize(
    "name", ["ckpt-007.safetensors", "ckpt-\u0663.safetensors", f"ckpt-{'9' * 19}.safetensors"]
)
def test_versions_ignores_names_that_are_not_canonical(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"")
    (tmp_path / "ckpt-5.safetensors").write_bytes(b"")
    assert checkpoints.versions(tmp_path) == [5]


def test_no_checkpoint(tmp_path: Path) -> None:
    assert checkpoints.load_newest(tmp_path) is None
    assert checkpoints.load_newest(tmp_path / "absent") is None


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


# --- the checksum ---------------------------------------------------------------------------


def by_hand(tens: dict[str, np.ndarray]) -> str:
    """The checksum as checkpoints.checksum's docstring defines it, written out again."""
    digest = hashlib.sha256()
    for name in sorted(tens):
        array = np.asarray(tens[name], dtype="<f4")
        digest.update(len(name.encode()).to_bytes(8, "little") + name.encode())
        digest.update(array.ndim.to_bytes(8, "little"))
        for dim in array.shape:
            digest.update(dim.to_bytes(8, "little"))
        digest.update(array.tobytes())
    return "sha256:" + digest.hexdigest()


def test_save_stores_the_documented_checksum(tmp_path: Path) -> None:
    tens = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.float32(2.5) * np.ones(1)}
    path = checkpoints.save(tmp_path, 3, tens, {}, keep=5)
    stored = weights.read_header(path.read_bytes())["__metadata__"]["checksum"]
    assert stored == by_hand(tens) == checkpoints.checksum(tens)


def test_checksum_tells_names_shapes_and_values_apart() -> None:
    base = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    variants = [
        {"v": base["w"]},
        {"w": base["w"].reshape(3, 2)},
        {"w": base["w"] + 1},
        {"w": base["w"], "x": np.zeros(0, np.float32)},
    ]
    sums = {checkpoints.checksum(t) for t in [base, *variants]}
    assert len(sums) == 5
    assert checkpoints.checksum({"w": base["w"].astype(np.float64)}) == checkpoints.checksum(base)


def test_a_flipped_bit_in_a_tensor_is_detected(model_dir: Path, caplog) -> None:
    newest = checkpoints.save(model_dir, 2, tensors(2), {}, keep=5)
    data = bytearray(newest.read_bytes())
    data[-3] ^= 0x01  # inside w's last float: a finite value that differs in one bit
    newest.write_bytes(bytes(data))
    refused(newest, 422, "checksum mismatch: metadata says sha256:")
    falls_back(model_dir, newest, caplog)


def test_a_malformed_checksum_is_refused(model_dir: Path, caplog) -> None:
    bad = write_unchecked(model_dir, 2, tensors(2), {"checksum": "md5:abc"})
    refused(bad, 422, "metadata checksum must be sha256:<64 hex digits>, got 'md5:abc'")
    falls_back(model_dir, bad, caplog)


def test_a_checkpoint_without_checksum_loads_with_one_warning(tmp_path: Path, caplog) -> None:
    old = write_unchecked(tmp_path, 4, tensors(4), {"samples": "7"})
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            ckpt = checkpoints.read(old)
            assert ckpt.version == 4 and ckpt.metadata["samples"] == "7"
    assert caplog.text.count(f"checkpoint {old} has no checksum") == 1


# --- what read() checks, and load_newest() skipping each --------------------------------------


@pytest.mark.parametrize(
    ("meta", "reason"),
    [
        (
            {"version": "abc"},
            "metadata version must be a non-negative integer of at most 18 digits, got 'abc'",
        ),
        ({"version": "-2"}, "got '-2'"),
        ({"version": " 2"}, "got ' 2'"),
        ({"version": "2e0"}, "got '2e0'"),
        ({"version": "1" * 19}, "got '1111111111111111111'"),
        ({"version": "\u0662"}, r"got '\u0662'"),
        ({"version": "3"}, "file name says version 2, metadata says 3"),
        (
            {"samples": "abc"},
            "metadata samples must be a non-negative integer of at most 18 digits, got 'abc'",
        ),
        ({"samples": "-5"}, "got '-5'"),
        ({"samples": "9" * 19}, "got '9999999999999999999'"),
        ({"samples": "9" * 5000}, "got '9999"),
        ({"samples": "1_000"}, "got '1_000'"),
        ({"updates": "1.5"}, "metadata updates must be"),
        ({"updates": ""}, "got ''"),
    ],
)
def test_bad_counts_are_refused_and_skipped(
    model_dir: Path, meta: dict, reason: str, caplog
) -> None:
    body = weights.encode(tensors(2), {"version": 2, **meta})
    bad = write_raw(model_dir, 2, body)
    refused(bad, 422, reason)
    falls_back(model_dir, bad, caplog)


def test_no_version_is_refused_and_skipped(model_dir: Path, caplog) -> None:
    bad = write_raw(model_dir, 2, weights.encode(tensors(2), {"samples": 3}))
    refused(bad, 422, "metadata has no version")
    falls_back(model_dir, bad, caplog)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_tensors_are_refused_and_skipped(model_dir: Path, value: float, caplog) -> None:
    bad = write_unchecked(model_dir, 2, {"w": np.full(4, value, np.float32)}, {})
    refused(bad, 422, "tensor w contains NaN or infinity")
    falls_back(model_dir, bad, caplog)


def header_body(header: str, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header.encode())) + header.encode() + data


def entry(dtype: str, nbytes: int, shape: int = 4) -> str:
    return json.dumps({"dtype": dtype, "shape": [shape], "data_offsets": [0, nbytes]})


META2 = '"__metadata__": {"version": "2"}'


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (
            header_body("{" + META2 + ', "w": ' + entry("I32", 16) + "}", b"\0" * 16),
            422,
            "tensor w is I32, expected F32",
        ),
        (
            header_body("{" + META2 + ', "w": ' + entry("BF16", 8) + "}", b"\0" * 8),
            422,
            "tensor w is BF16, expected F32",
        ),
        (
            header_body("{" + META2 + ', "w": ' + entry("F8_E4M3", 4) + "}", b"\0" * 4),
            422,
            "tensor w is F8_E4M3",
        ),
        (
            header_body("{" + META2 + ', "w": ' + entry("F4", 2) + "}", b"\0" * 2),
            422,
            "tensor w is F4",
        ),
        (
            header_body('{"__metadata__": ' + "[" * 3000 + "]" * 3000 + "}"),
            400,
            "nested too deeply",
        ),
        (
            header_body('{"__metadata__": {"version": ' + "2" * 4400 + "}}"),
            400,
            "integer of 4400 digits",
        ),
        (
            header_body('{"__metadata__": {"version": 2}}'),
            400,
            "metadata version is a number, expected a string",
        ),
        (
            header_body('{"__metadata__": {"version": "2", "version": "2"}}'),
            400,
            "duplicate key 'version'",
        ),
        (
            header_body("{" + META2 + ', "w": ' + entry("F32", 2**64) + "}"),
            400,
            "integer of 20 digits",
        ),
        (b"", 400, "too short for safetensors"),
        (b"\0" * 64, 400, "not JSON"),
    ],
    ids=[
        "int32",
        "bf16",
        "f8",
        "f4",
        "deep",
        "huge-int",
        "number",
        "duplicate",
        "offset-overflow",
        "empty",
        "zeros",
    ],
)
def test_unreadable_files_are_refused_and_skipped(
    model_dir: Path, body: bytes, status: int, reason: str, caplog
) -> None:
    bad = write_raw(model_dir, 2, body)
    refused(bad, status, reason)
    falls_back(model_dir, bad, caplog)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "wrong-version"])
def test_corrupt_newest_is_skipped_with_a_warning(model_dir: Path, damage: str, caplog) -> None:
    newest = checkpoints.save(model_dir, 2, tensors(2), {}, keep=5)
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        newest.write_bytes(b"\x00" * len(data))
    elif damage == "empty":
        newest.write_bytes(b"")
    else:
        checkpoints.save(model_dir, 3, tensors(3), {}, keep=5)
        (model_dir / "ckpt-3.safetensors").rename(newest)
    falls_back(model_dir, newest, caplog)


def test_an_unreadable_file_is_skipped(model_dir: Path, caplog) -> None:
    bad = checkpoints.path_for(model_dir, 2)
    bad.mkdir()  # reading it raises IsADirectoryError
    falls_back(model_dir, bad, caplog)


def test_any_exception_from_reading_is_skipped(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    bad = checkpoints.save(model_dir, 2, tensors(2), {}, keep=5)
    real = checkpoints.read

    def read(path: Path) -> checkpoints.Checkpoint:
        if path == bad:
            raise RecursionError("maximum recursion depth exceeded")
        return real(path)

    monkeypatch.setattr(checkpoints, "read", read)
    falls_back(model_dir, bad, caplog)
    assert "RecursionError" in caplog.text


def test_check_may_refuse_a_checkpoint_that_reads_well(model_dir: Path, caplog) -> None:
    other = checkpoints.save(model_dir, 2, {"v": np.zeros(3, np.float32)}, {}, keep=5)

    def fits(ckpt: checkpoints.Checkpoint) -> None:
        weights.validate(ckpt.tensors, (("w", (4,)),))

    ckpt = checkpoints.load_newest(model_dir, check=fits)
    assert ckpt is not None and ckpt.version == 1
    assert f"skipping checkpoint {other}: wrong tensor names" in caplog.text


def test_every_file_bad_gives_none(tmp_path: Path, caplog) -> None:
    write_raw(tmp_path, 1, b"junk")
    write_raw(tmp_path, 2, b"")
    assert checkpoints.load_newest(tmp_path) is None
    assert caplog.text.count("skipping checkpoint") == 2


# --- save() writes nothing that read() would refuse -----------------------------------------


@pytest.mark.parametrize(
    ("tens", "meta", "reason"),
    [
        ({"w": np.full(2, np.nan, np.float32)}, {}, "tensor w contains NaN or infinity"),
        ({"w": np.full(2, 1e300)}, {}, "tensor w contains NaN or infinity"),  # inf as float32
        (tensors(1), {"samples": -1}, "metadata samples must be a non-negative integer"),
        (tensors(1), {"updates": 10**18}, "got '1000000000000000000'"),
        (tensors(1), {"note": "x" * weights.MAX_HEADER_BYTES}, "checkpoint header would be"),
    ],
)
def test_save_refuses_what_read_would_refuse(tmp_path: Path, tens, meta, reason: str) -> None:
    with pytest.raises(weights.WeightsError, match=reason):
        checkpoints.save(tmp_path, 1, tens, meta, keep=5)
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_a_version_that_is_not_an_integer(tmp_path: Path) -> None:
    for version in ("1", -1, True):
        with pytest.raises(weights.WeightsError, match="version"):
            checkpoints.save(tmp_path, version, tensors(1), {}, keep=5)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_metadata_values_over_the_upload_bound_still_read(tmp_path: Path) -> None:
    ids = json.dumps([f"{i:032x}" for i in range(256)])  # ~9 kB of saved update ids
    assert len(ids) > weights.MAX_METADATA_VALUE
    path = checkpoints.save(tmp_path, 1, tensors(1), {"applied_ids": ids}, keep=5)
    assert checkpoints.read(path).metadata["applied_ids"] == ids


# --- temporary files left by a kill ---------------------------------------------------------

KILLED_WRITE = """
import os, sys
from pathlib import Path
from fedsim import checkpoints
os.fsync = lambda fd: os._exit(9)  # die like SIGKILL: after the temp file exists, before rename
checkpoints.write_atomic(Path(sys.argv[1]) / sys.argv[2], b"partial")
"""


def kill_mid_write(model_dir: Path, name: str) -> None:
    done = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(model_dir), name], check=False)
    assert done.returncode == 9


def test_remove_temporaries_removes_what_a_killed_write_left(model_dir: Path) -> None:
    for name in ("ckpt-2.safetensors", "latest", "settings.json"):
        kill_mid_write(model_dir, name)
    keep = [
        ".hidden",
        "notes.tmp",
        ".ckpt-2.safetensors.tmp",
        ".x.short.tmp",
        "ckpt-2.abcdefgh.tmp",
    ]
    for name in keep:
        (model_dir / name).write_bytes(b"")
    (model_dir / ".dir.abcdefgh.tmp").mkdir()
    left = sorted(p for p in model_dir.iterdir() if p.name.endswith(".tmp") and p.is_file())
    assert len(left) == 3 + 4  # one per killed write, and four look-alikes

    removed = checkpoints.remove_temporaries(model_dir)

    assert sorted(p.name.split(".")[1] for p in removed) == ["ckpt-2", "latest", "settings"]
    assert all(not p.exists() for p in removed)
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(
        [*keep, ".dir.abcdefgh.tmp", "ckpt-1.safetensors", "latest"]
    )
    assert checkpoints.load_newest(model_dir).version == 1
    assert checkpoints.remove_temporaries(model_dir) == []


def test_remove_temporaries_without_a_folder(tmp_path: Path) -> None:
    assert checkpoints.remove_temporaries(tmp_path / "absent") == []
