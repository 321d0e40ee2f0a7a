"""Partitions of the training set into logical clients, and the partitions.json plan file."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim import config
from fedsim.data import mnist, partition
from fedsim.data.partition import PartitionError


@pytest.fixture(scope="module")
def labels(mnist_dir: Path) -> np.ndarray:
    return mnist.load_file(mnist_dir, "train-labels", verify=True)


def plan(name: str, seed: int = 42, **keys: object) -> dict[str, object]:
    defaults = {"NUM_CLIENTS": 100, "SHARDS_PER_CLIENT": 2, "DIRICHLET_ALPHA": 0.5}
    out: dict[str, object] = {"PARTITION": name, "SEED": seed}
    for key in partition.PARTITION_KEYS[name][2:]:
        out[key] = keys.get(key, defaults.get(key))
    return out


def assert_each_index_once(parts: tuple[partition.Part, ...], n: int) -> None:
    every = np.concatenate([p.indices for p in parts])
    np.testing.assert_array_equal(np.sort(every), np.arange(n))


# --- shards ----------------------------------------------------------------------------


def test_shards_of_one_class_each_give_two_whole_classes_per_client() -> None:
    labels = np.repeat(np.arange(10), 6)  # 60 images, 6 per class: 10 shards of 6 are classes
    parts = partition.make(plan("shards", NUM_CLIENTS=5, SHARDS_PER_CLIENT=2), labels)
    seen = []
    for part in parts:
        histogram = np.bincount(labels[part.indices], minlength=10)
        assert sorted(histogram.tolist()) == [0] * 8 + [6, 6]
        seen += np.flatnonzero(histogram).tolist()
    assert sorted(seen) == list(range(10))  # every class dealt to exactly one client


def test_shards_of_half_a_class_give_multiples_of_three() -> None:
    labels = np.repeat(np.arange(10), 6)  # 20 shards of 3: each is half of one class
    parts = partition.make(plan("shards", NUM_CLIENTS=10, SHARDS_PER_CLIENT=2), labels)
    for part in parts:
        histogram = np.bincount(labels[part.indices], minlength=10)
        assert histogram.sum() == 6 and (histogram % 3 == 0).all()


def test_shards_on_mnist_are_whole_label_sorted_shards(labels: np.ndarray) -> None:
    """Each client holds exactly two shards of the label-sorted order, so its histogram is
    the sum of those two shards' histograms; together the clients hold every shard once."""
    parts = partition.make(plan("shards"), labels)
    shard_of = np.empty(len(labels), np.int64)
    shard_of[np.argsort(labels, kind="stable")] = np.arange(len(labels)) // 300
    dealt = []
    for part in parts:
        shards, counts = np.unique(shard_of[part.indices], return_counts=True)
        assert len(shards) == 2 and (counts == 300).all()
        dealt += shards.tolist()
        in_shards = np.flatnonzero(np.isin(shard_of, shards))
        np.testing.assert_array_equal(
            np.bincount(labels[part.indices], minlength=10),
            np.bincount(labels[in_shards], minlength=10),
        )
        # a shard of 300 sorted labels straddles at most two digits
        assert 1 <= np.count_nonzero(np.bincount(labels[part.indices])) <= 4
    assert sorted(dealt) == list(range(200))


def test_shards_must_divide_the_images() -> None:
    with pytest.raises(PartitionError, match="7 shards do not divide 60 images"):
        partition.make(plan("shards", NUM_CLIENTS=7, SHARDS_PER_CLIENT=1), np.zeros(60, int))


# --- every index once, for random valid parameters --------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["iid", "shards", "dirichlet"]),
    seed=st.integers(0, 2**32),
    clients=st.integers(1, 40),
    per_client=st.integers(1, 4),
    shard_size=st.integers(1, 30),
    extra=st.integers(0, 500),
    alpha=st.floats(0.01, 100),
    classes=st.integers(1, 10),
)
def test_every_index_used_exactly_once(
    name, seed, clients, per_client, shard_size, extra, alpha, classes
) -> None:
    if name == "shards":
        n = clients * per_client * shard_size
    elif name == "dirichlet":
        n = clients * config.MIN_CLIENT_SAMPLES + extra
    else:
        n = clients + extra
    labels = np.random.default_rng(seed).integers(0, classes, n)
    keys = {"NUM_CLIENTS": clients, "SHARDS_PER_CLIENT": per_client, "DIRICHLET_ALPHA": alpha}
    parts = partition.make(plan(name, seed, **keys), labels)
    assert [p.id for p in parts] == [f"client-{i}" for i in range(1, clients + 1)]
    assert_each_index_once(parts, n)
    sizes = [len(p.indices) for p in parts]
    if name == "iid":
        assert max(sizes) - min(sizes) <= 1
    elif name == "shards":
        assert set(sizes) == {per_client * shard_size}
    else:
        assert min(sizes) >= config.MIN_CLIENT_SAMPLES


# --- seeds ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["iid", "shards", "dirichlet"])
def test_same_seed_same_plan_other_seed_another(labels: np.ndarray, name: str) -> None:
    first = partition.make(plan(name, seed=7), labels)
    # the plan as read back from JSON makes the same clients
    again = partition.make(json.loads(json.dumps(plan(name, seed=7))), labels)
    other = partition.make(plan(name, seed=8), labels)
    assert [p.sha256 for p in first] == [p.sha256 for p in again]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.indices, b.indices)
    assert [p.sha256 for p in first] != [p.sha256 for p in other]
    # another seed deals other images, not only another order
    assert any(
        not np.array_equal(np.sort(a.indices), np.sort(b.indices))
        for a, b in zip(first, other, strict=True)
    )


def test_iid_is_mcmahans_100_by_600(labels: np.ndarray) -> None:
    parts = partition.make(plan("iid"), labels)
    assert [len(p.indices) for p in parts] == [600] * 100
    assert_each_index_once(parts, 60_000)


def test_clients_train_mixed_batches(labels: np.ndarray) -> None:
    # shards are label-sorted; a client's order interleaves its two shards' images
    part = partition.make(plan("shards"), labels)[0]
    first_half = labels[part.indices[:300]]
    assert len(np.unique(first_half)) == len(np.unique(labels[part.indices]))


# --- dirichlet --------------------------------------------------------------------------


@pytest.mark.parametrize(("alpha", "clients"), [(0.01, 1000), (0.01, 6000), (0.1, 100)])
def test_dirichlet_minimum_even_for_tiny_alpha(
    labels: np.ndarray, alpha: float, clients: int
) -> None:
    parts = partition.make(plan("dirichlet", NUM_CLIENTS=clients, DIRICHLET_ALPHA=alpha), labels)
    assert len(parts) == clients
    assert min(len(p.indices) for p in parts) >= config.MIN_CLIENT_SAMPLES
    assert_each_index_once(parts, 60_000)


def test_dirichlet_small_alpha_skews_labels(labels: np.ndarray) -> None:
    def mean_labels(alpha: float) -> float:
        parts = partition.make(plan("dirichlet", DIRICHLET_ALPHA=alpha), labels)
        return np.mean([len(np.unique(labels[p.indices])) for p in parts])

    assert mean_labels(0.05) < mean_labels(100) == 10


def test_raise_to_minimum_by_hand() -> None:
    counts = np.zeros((3, 10), np.int64)
    counts[0, 2], counts[0, 7] = 20, 10  # client 1: 30 images, classes 2 and 7
    counts[2, 1] = 5  # client 3: 5 images; client 2: none
    partition._raise_to_minimum(counts, 10)
    # client 2 takes 10 from the largest (client 1), its highest class (7) first;
    # then client 3 takes 5 from client 1 (still the largest), now from class 2.
    assert counts.sum(axis=1).tolist() == [15, 10, 10]
    assert counts[1, 7] == 10 and counts[2, 2] == 5 and counts[2, 1] == 5
    assert counts[0, 2] == 15 and counts[0, 7] == 0


def test_dirichlet_needs_room_for_the_minimum() -> None:
    with pytest.raises(PartitionError, match="NUM_CLIENTS=7 clients of at least 10"):
        partition.make(plan("dirichlet", NUM_CLIENTS=7), np.zeros(69, int))


# --- slices -----------------------------------------------------------------------------


def test_slices_are_the_original_contiguous_slices(make_settings, labels: np.ndarray) -> None:
    settings = make_settings(CLIENT_SLICES="1-2 5 9-12", NUM_IMAGES_TRAIN="5000")
    parts = partition.make(partition.plan_settings(settings), labels)
    assert [(p.id, p.slices) for p in parts] == [
        ("client-1", (1, 2)),
        ("client-2", (5, 5)),
        ("client-3", (9, 12)),
    ]
    for part in parts:
        lo, hi = part.slices
        np.testing.assert_array_equal(part.indices, np.arange((lo - 1) * 5000, hi * 5000))
        for s in range(lo, hi + 1):
            start, stop = mnist.slice_range(s, 5000)
            np.testing.assert_array_equal(
                partition.slice_indices(part, s, 5000), np.arange(start, stop)
            )
    with pytest.raises(PartitionError, match="slice 3 is not in client-1's slices 1-2"):
        partition.slice_indices(parts[0], 3, 5000)
    iid = partition.make(plan("iid", NUM_CLIENTS=2), labels)[0]
    with pytest.raises(PartitionError, match="client-1 has no slices"):
        partition.slice_indices(iid, 1, 5000)


def test_parts_are_read_only() -> None:
    part = partition.Part("client-1", [3, 1, 2])
    assert part.indices.dtype == np.int64
    with pytest.raises(ValueError, match="read-only"):
        part.indices[0] = 0


# --- digest -----------------------------------------------------------------------------


def test_digest_is_sha256_of_little_endian_int64() -> None:
    expected = hashlib.sha256(struct.pack("<3q", 5, 0, 59_999)).hexdigest()
    assert partition.digest(np.array([5, 0, 59_999], np.int64)) == expected
    assert partition.digest(np.array([5, 0, 59_999], np.int32)) == expected
    assert partition.digest(np.array([5, 0, 59_999], ">i8")) == expected
    assert partition.Part("client-1", np.array([5, 0, 59_999])).sha256 == expected
    assert partition.digest(np.array([0, 5, 59_999])) != expected  # the order counts
    with pytest.raises(PartitionError, match="1-D integer"):
        partition.digest(np.array([0.5]))


# --- manifest, write, read --------------------------------------------------------------


def test_manifest_round_trip(tmp_path: Path, labels: np.ndarray) -> None:
    the_plan = plan("shards")
    parts = partition.make(the_plan, labels)
    content = partition.manifest(the_plan, parts, labels)
    assert content["format"] == 1 and content["train_images"] == 60_000
    assert content["settings"] == the_plan
    for part, client in zip(parts, content["clients"], strict=True):
        assert client["id"] == part.id and client["samples"] == 600
        assert client["labels"] == np.bincount(labels[part.indices], minlength=10).tolist()
        assert client["sha256"] == part.sha256 and "slices" not in client
    path = partition.write(tmp_path / "models", content)
    assert path == tmp_path / "models" / "partitions.json"
    assert [p.name for p in path.parent.iterdir()] == ["partitions.json"]  # no temp files left
    read = partition.read(tmp_path / "models")
    assert read == content
    # the plan read back rebuilds the same clients
    assert [p.sha256 for p in partition.make(read["settings"], labels)] == [
        c["sha256"] for c in read["clients"]
    ]


def test_slices_manifest_names_the_ranges(tmp_path: Path, labels: np.ndarray) -> None:
    the_plan = {"PARTITION": "slices", "SEED": 1, "NUM_IMAGES_TRAIN": 5000, "CLIENT_SLICES": "3-4"}
    content = partition.manifest(the_plan, partition.make(the_plan, labels), labels)
    assert content["clients"][0]["slices"] == [3, 4]
    assert content["clients"][0]["samples"] == 10_000
    partition.write(tmp_path, content)
    assert partition.read(tmp_path) == content
    assert partition.summary(content).endswith("10000 of 60000 images used")


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PartitionError, match=r"no partitions\.json in .*fedsim\.prepare") as info:
        partition.read(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_read_corrupt_file(tmp_path: Path) -> None:
    (tmp_path / "partitions.json").write_text('{"format": 1, "clients": [')
    with pytest.raises(PartitionError, match=r"partitions\.json: not JSON") as info:
        partition.read(tmp_path)
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


def _good() -> dict:
    labels = np.repeat(np.arange(10), 6)
    the_plan = plan("iid", NUM_CLIENTS=2)
    return partition.manifest(the_plan, partition.make(the_plan, labels), labels)


def _slices_good() -> dict:
    labels = np.repeat(np.arange(10), 6)
    the_plan = {"PARTITION": "slices", "SEED": 1, "NUM_IMAGES_TRAIN": 20, "CLIENT_SLICES": "1-2"}
    return partition.manifest(the_plan, partition.make(the_plan, labels), labels)


@pytest.mark.parametrize(
    ("make_content", "breaks", "message"),
    [
        (_good, lambda m: m.clear(), "format is None"),
        (_good, lambda m: m.update(format=2), "format is 2, expected 1"),
        (_good, lambda m: m["settings"].update(PARTITION="random"), "PARTITION is 'random'"),
        (_good, lambda m: m["settings"].pop("SEED"), "SEED is None"),
        (_good, lambda m: m["settings"].update(NUM_CLIENTS=True), "NUM_CLIENTS is True"),
        (_good, lambda m: m["settings"].update(SHARDS_PER_CLIENT=2), "does not use"),
        (_good, lambda m: m["settings"].update(NUM_CLIENTS=3), "2 clients, but NUM_CLIENTS is 3"),
        (_good, lambda m: m.update(train_images="60000"), "train_images is '60000'"),
        (_good, lambda m: m.update(clients=[]), "clients is not a non-empty list"),
        (_good, lambda m: m["clients"][1].update(id="client-7"), r"clients\[1\] id is"),
        (_good, lambda m: m["clients"][0].update(samples=0), r"clients\[0\] samples is 0"),
        (_good, lambda m: m["clients"][0]["labels"].pop(), "labels is not 10 counts"),
        (_good, lambda m: m["clients"][0]["labels"].__setitem__(0, 99), "summing to 30"),
        (_good, lambda m: m["clients"][0].update(sha256="ABC"), "sha256 is 'ABC'"),
        (_good, lambda m: m["clients"][0].update(slices=[1, 2]), "exactly the keys"),
        (_slices_good, lambda m: m["clients"][0].pop("slices"), "exactly the keys"),
        (_slices_good, lambda m: m["clients"][0].update(slices=[2, 1]), "slices is \\[2, 1\\]"),
        (_slices_good, lambda m: m["settings"].update(CLIENT_SLICES=" "), "CLIENT_SLICES is"),
    ],
)
def test_read_malformed_file(tmp_path: Path, make_content, breaks, message: str) -> None:
    content = make_content()
    partition.write(tmp_path, content)
    assert partition.read(tmp_path) == content  # valid before it is broken
    breaks(content)
    (tmp_path / "partitions.json").write_text(json.dumps(content))
    with pytest.raises(PartitionError, match=message) as info:
        partition.read(tmp_path)
    text = str(info.value)
    assert "\n" not in text and text.startswith(str(tmp_path / "partitions.json") + ": ")


def test_read_an_array_is_malformed(tmp_path: Path) -> None:
    (tmp_path / "partitions.json").write_text("[1, 2]")
    with pytest.raises(PartitionError, match="not a JSON object"):
        partition.read(tmp_path)


def test_partition_errors_are_data_errors_for_the_command_line() -> None:
    assert issubclass(PartitionError, ValueError) and issubclass(PartitionError, mnist.DataError)


# --- settings ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", config.PARTITIONS)
def test_plan_settings(make_settings, name: str) -> None:
    settings = make_settings(PARTITION=name, NUM_CLIENTS="50", SEED="3", DIRICHLET_ALPHA="0.3")
    got = partition.plan_settings(settings)
    assert tuple(got) == partition.PARTITION_KEYS[name]
    assert got["PARTITION"] == name and got["SEED"] == 3
    assert json.loads(json.dumps(got)) == got
    if name == "slices":
        assert got["CLIENT_SLICES"] == config.DEFAULT_SLICES
    else:
        assert got["NUM_CLIENTS"] == 50
    if name == "dirichlet":
        assert got["DIRICHLET_ALPHA"] == 0.3


def test_differences_name_what_differs(make_settings) -> None:
    settings = make_settings(PARTITION="shards", NUM_CLIENTS="100")
    labels = np.repeat(np.arange(10), 600)
    the_plan = partition.plan_settings(settings)
    content = partition.manifest(the_plan, partition.make(the_plan, labels), labels)
    assert partition.differences(content, settings) == []
    assert partition.differences(content, make_settings(PARTITION="shards", NUM_CLIENTS="50")) == [
        "NUM_CLIENTS is 50 here, 100 in partitions.json"
    ]
    assert partition.differences(
        content, make_settings(PARTITION="dirichlet", NUM_CLIENTS="100", SEED="1")
    ) == [
        "PARTITION is dirichlet here, shards in partitions.json",
        "SEED is 1 here, 42 in partitions.json",
    ]


def test_differences_quote_slices(make_settings, labels: np.ndarray) -> None:
    settings = make_settings()
    the_plan = partition.plan_settings(settings)
    content = partition.manifest(the_plan, partition.make(the_plan, labels), labels)
    assert partition.differences(content, make_settings(CLIENT_SLICES="1-6 7-12")) == [
        "CLIENT_SLICES is '1-6 7-12' here, '1-4 5-8 9-12' in partitions.json"
    ]


def test_summary_line(labels: np.ndarray) -> None:
    shards = plan("shards", NUM_CLIENTS=50, SHARDS_PER_CLIENT=4)
    content = partition.manifest(shards, partition.make(shards, labels), labels)
    line = partition.summary(content)
    assert line.startswith("plan: shards (4 per client), 50 clients of 1200 samples, ")
    assert "of 60000 images used" not in line
    dirichlet = plan("dirichlet", NUM_CLIENTS=10)
    content = partition.manifest(dirichlet, partition.make(dirichlet, labels), labels)
    sizes = [c["samples"] for c in content["clients"]]
    assert f"samples on average ({min(sizes)}-{max(sizes)})," in partition.summary(content)


def test_make_refuses_bad_labels_and_plans() -> None:
    with pytest.raises(PartitionError, match="labels must lie in 0-9, found 10"):
        partition.make(plan("iid", NUM_CLIENTS=2), np.array([0, 10]))
    with pytest.raises(PartitionError, match="NUM_CLIENTS=3 is more than the 2 images"):
        partition.make(plan("iid", NUM_CLIENTS=3), np.array([0, 1]))
    with pytest.raises(PartitionError, match="plan DIRICHLET_ALPHA is 0"):
        partition.make(plan("dirichlet", DIRICHLET_ALPHA=0), np.zeros(100, int))
