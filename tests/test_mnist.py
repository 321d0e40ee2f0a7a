"""MNIST IDX files: parsing good, truncated and wrong-magic files, checksums, slicing."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedsim.data import mnist


def idx(array: np.ndarray) -> bytes:
    header = bytes((0, 0, 8, array.ndim)) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_parse_good_images_and_labels() -> None:
    images = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    parsed = mnist.parse_idx(idx(images), 3, "x")
    assert parsed.shape == (2, 3, 4)
    np.testing.assert_array_equal(parsed, images)
    labels = np.array([7, 1, 9])
    np.testing.assert_array_equal(mnist.parse_idx(idx(labels), 1, "y"), labels)


def test_truncated_file_says_what_was_expected_and_found() -> None:
    content = idx(np.zeros((2, 3, 4)))[:-5]
    with pytest.raises(
        mnist.DataError, match=r"f: truncated: header says 2x3x4 = 24 bytes of data, found 19"
    ):
        mnist.parse_idx(content, 3, "f")


def test_too_short_for_a_header() -> None:
    with pytest.raises(mnist.DataError, match="shorter than an IDX header"):
        mnist.parse_idx(b"\x00\x00\x08", 1, "f")


def test_wrong_magic_number() -> None:
    content = bytearray(idx(np.zeros(3)))
    content[2] = 0x0D  # float32 instead of unsigned bytes
    with pytest.raises(
        mnist.DataError, match=r"wrong magic number: expected 00000801.*found 00000d01"
    ):
        mnist.parse_idx(bytes(content), 1, "f")


def test_labels_file_where_images_were_expected() -> None:
    with pytest.raises(mnist.DataError, match="wrong magic number"):
        mnist.parse_idx(idx(np.zeros(3)), 3, "f")


def test_real_mnist_gzipped_and_plain(mnist_dir: Path, tmp_path: Path) -> None:
    images, labels = mnist.load_pair(mnist_dir, "t10k", verify=True)
    assert images.shape == (10_000, 28, 28) and labels.shape == (10_000,)
    assert set(np.unique(labels)) == set(range(10))
    # The same content uncompressed passes the same checksum.
    for spec in (mnist.FILES["t10k-images"], mnist.FILES["t10k-labels"]):
        with gzip.open(mnist_dir / f"{spec.name}.gz") as src:
            (tmp_path / spec.name).write_bytes(src.read())
    plain_images, _ = mnist.load_pair(tmp_path, "t10k", verify=True)
    np.testing.assert_array_equal(plain_images, images)


def test_checksum_mismatch_names_file_and_both_digests(mnist_dir: Path, tmp_path: Path) -> None:
    spec = mnist.FILES["t10k-labels"]
    with gzip.open(mnist_dir / f"{spec.name}.gz") as src:
        content = bytearray(src.read())
    content[-1] ^= 1  # one flipped label still parses
    (tmp_path / spec.name).write_bytes(bytes(content))
    with pytest.raises(mnist.DataError) as info:
        mnist.load_file(tmp_path, "t10k-labels", verify=True)
    message = str(info.value)
    assert spec.name in message and spec.sha256 in message and "checksum mismatch" in message
    assert "DATA_VERIFY=false" in message
    # Unverified, other IDX data of the same shape loads.
    assert mnist.load_file(tmp_path, "t10k-labels", verify=False).shape == (10_000,)


def test_corrupt_gzip(tmp_path: Path) -> None:
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b" + b"garbage")
    with pytest.raises(mnist.DataError, match="not a readable gzip file"):
        mnist.load_file(tmp_path, "t10k-labels", verify=True)


def test_missing_file_says_where_to_put_the_four_files(tmp_path: Path) -> None:
    with pytest.raises(mnist.DataError) as info:
        mnist.load_pair(tmp_path, "train", verify=True)
    message = str(info.value)
    assert "missing train-images-idx3-ubyte" in message
    for spec in mnist.FILES.values():
        assert spec.name + ".gz" in message
    assert str(tmp_path) in message


def test_download_failure_leaves_nothing_behind(mnist_dir: Path, tmp_path: Path) -> None:
    shutil.copy(mnist_dir / "t10k-images-idx3-ubyte.gz", tmp_path)
    unreachable = ("http://127.0.0.1:9/mnist/",)
    with pytest.raises(mnist.DataError) as info:
        mnist.ensure(tmp_path, unreachable, verify=True)
    assert "could not download train-images-idx3-ubyte.gz" in str(info.value)
    assert "put the four MNIST files" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t10k-images-idx3-ubyte.gz"]


def test_download_from_a_mirror(mnist_dir: Path, tmp_path: Path) -> None:
    # A file:// mirror exercises the same path as an HTTP one, without a network.
    mirror = (mnist_dir.resolve().as_uri() + "/",)
    mnist.ensure(tmp_path / "data", mirror, verify=True)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(
        spec.name + ".gz" for spec in mnist.FILES.values()
    )


@pytest.mark.parametrize(
    ("index", "size", "expected"),
    [
        (1, 5000, (0, 5000)),
        (5, 5000, (20000, 25000)),
        (12, 5000, (55000, 60000)),
        (3, 2000, (4000, 6000)),
    ],
)
def test_slice_range(index: int, size: int, expected: tuple[int, int]) -> None:
    assert mnist.slice_range(index, size) == expected


def test_slice_numbers_start_at_one() -> None:
    with pytest.raises(ValueError, match="start at 1"):
        mnist.slice_range(0, 5000)


def test_scale_to_unit_interval() -> None:
    scaled = mnist.scale(np.array([[0, 255, 51]], dtype=np.uint8))
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled, [[0.0, 1.0, 0.2]])
