"""plots: the learning curve, the confusion heat map and the clients' label distribution as PNGs."""

from __future__ import annotations

import struct
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib.image import imread

from fedsim import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def decoded(path: Path) -> np.ndarray:
    """The pixels (height, width, channels), floats in [0, 1]: the whole file decodes."""
    pixels = imread(path)
    assert pixels.shape[:2] == png_size(path)[::-1]
    return pixels


def entries(rounds: bool, count: int = 8) -> list[dict]:
    return [
        {
            "version": 3 * n,
            "round": n if rounds else None,
            "time": f"2026-01-01T00:00:{n:02d}+00:00",
            "accuracy": 0.5 + 0.4 * (1 - 0.7**n),
            "loss": 1.5 * 0.7**n + 0.1,
            "samples": 600 * n,
            "updates": 3 * n,
            "clients": ["client-1"],
        }
        for n in range(1, count + 1)
    ]


def manifest(histograms: list[list[int]]) -> dict:
    return {
        "format": 1,
        "settings": {"PARTITION": "shards", "SEED": 42},
        "train_images": sum(map(sum, histograms)),
        "clients": [
            {"id": f"client-{i}", "samples": sum(h), "labels": h, "sha256": "0" * 64}
            for i, h in enumerate(histograms, 1)
        ],
    }


def test_the_backend_is_agg():
    assert matplotlib.get_backend().lower() == "agg"


def test_learning_curve_png(tmp_path):
    path = plots.learning_curve(entries(rounds=True), tmp_path / "out" / "curve.png", "fedavg")
    assert path == tmp_path / "out" / "curve.png"
    assert png_size(path) == (1000, 500) == plots.LEARNING_CURVE_SIZE
    assert decoded(path).std() > 0  # something is drawn


def test_the_x_axis_is_the_round_only_when_every_entry_has_one(tmp_path):
    by_round, by_version = entries(rounds=True), entries(rounds=False)
    assert plots.x_axis(by_round) == ("round", list(range(1, 9)))
    assert plots.x_axis(by_version) == ("version", list(range(3, 25, 3)))
    mixed = by_round[:4] + by_version[4:]
    assert plots.x_axis(mixed) == ("version", list(range(3, 25, 3)))

    # An asynchronous history draws as well, and differently from the same values by round.
    a = plots.learning_curve(by_version, tmp_path / "versions.png", "fedasync")
    b = plots.learning_curve(by_round, tmp_path / "rounds.png", "fedasync")
    assert png_size(a) == png_size(b) == plots.LEARNING_CURVE_SIZE
    assert not np.array_equal(decoded(a), decoded(b))


def test_a_single_evaluation_plots(tmp_path):
    path = plots.learning_curve(entries(rounds=True, count=1), tmp_path / "one.png", "one")
    assert png_size(path) == plots.LEARNING_CURVE_SIZE


def test_confusion_heatmap_png(tmp_path):
    rng = np.random.default_rng(0)
    confusion = (np.diag(rng.integers(900, 1100, 10)) + rng.integers(0, 30, (10, 10))).tolist()
    path = plots.confusion_heatmap(confusion, tmp_path / "confusion.png", "version 3")
    assert png_size(path) == (700, 600) == plots.CONFUSION_SIZE
    decoded(path)


def test_label_distribution_of_100_clients_stacks_each_clients_labels(tmp_path):
    # Clients 1-50 hold only 3s; clients 51-100 half 1s and half 7s; no other digit.
    histograms = [[0, 0, 0, 600, 0, 0, 0, 0, 0, 0]] * 50
    histograms += [[0, 300, 0, 0, 0, 0, 0, 300, 0, 0]] * 50
    path = plots.label_distribution(manifest(histograms), tmp_path / "clients.png", "shards")
    assert png_size(path) == (1200, 500) == plots.CLIENTS_SIZE
    pixels = decoded(path)[..., :3]
    colours = matplotlib.colormaps["tab10"]

    def area(digit: int) -> int:
        return int((np.abs(pixels - colours(digit)[:3]).max(axis=-1) < 1 / 255).sum())

    # Every digit's colour is in the legend; the bars' areas follow the counts.
    assert all(area(d) > 0 for d in range(10))
    assert area(1) == pytest.approx(area(7), rel=0.1)
    assert area(3) == pytest.approx(2 * area(7), rel=0.15)
    assert area(0) < area(7) / 20


def test_label_distribution_with_few_named_clients(tmp_path):
    clients = manifest([[60] * 10, [10] * 10, [0] * 9 + [5]])
    for client, name in zip(clients["clients"], ("alice", "bob", "carol"), strict=True):
        client["id"] = name
    path = plots.label_distribution(clients, tmp_path / "few.png", "slices")
    assert png_size(path) == plots.CLIENTS_SIZE


def test_tick_labels_are_numbers_for_client_n_ids():
    assert plots._tick_labels(["client-1", "client-12"]) == (
        ["1", "12"],
        "logical client (client-N)",
    )
    assert plots._tick_labels(["client-1", "alice"]) == (["client-1", "alice"], "logical client")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: plots.learning_curve([], p, "t"), "no history entries"),
        (
            lambda p: plots.learning_curve([{"version": 1, "accuracy": 0.5}], p, "t"),
            "history entry 1 has no finite loss",
        ),
        (lambda p: plots.confusion_heatmap([[1] * 10] * 9, p, "t"), "must be 10x10"),
        (
            lambda p: plots.confusion_heatmap([[-1] * 10] * 10, p, "t"),
            "non-negative whole counts",
        ),
        (
            lambda p: plots.confusion_heatmap([[0.5] * 10] * 10, p, "t"),
            "non-negative whole counts",
        ),
        (lambda p: plots.label_distribution({"clients": []}, p, "t"), "no list of clients"),
        (
            lambda p: plots.label_distribution(manifest([[1] * 10, [1] * 9]), p, "t"),
            "client 2 has no label histogram of 10 non-negative counts",
        ),
    ],
)
def test_bad_input_is_named_and_writes_nothing(tmp_path, call, message):
    path = tmp_path / "bad.png"
    with pytest.raises(ValueError, match=message):
        call(path)
    assert not path.exists()
