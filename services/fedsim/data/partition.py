"""How MNIST's training images are dealt to logical clients, and the plan file that records it.

`PARTITION` picks the rule; every random choice comes from `numpy.random.default_rng(SEED)`,
so the same plan (the settings in `PARTITION_KEYS`) and labels always give the same clients:

- `slices`: the original. One client per range of `CLIENT_SLICES`; slice s is the images
  [(s-1) N, s N) with N = `NUM_IMAGES_TRAIN`, and a client trains its slices in order.
  Images outside every range are not used.
- `iid`: a seeded permutation cut into `NUM_CLIENTS` parts whose sizes differ by at most
  one (McMahan et al. 2017, arXiv:1602.05629: 100 clients x 600 images).
- `shards`: McMahan et al.'s pathological non-IID split: the images sorted by label
  (stable), cut into `NUM_CLIENTS x SHARDS_PER_CLIENT` equal shards, and
  `SHARDS_PER_CLIENT` seeded-random shards dealt to each client.
- `dirichlet`: label skew after Hsu, Qi, Brown 2019 (arXiv:1909.06335), in the per-class
  form of Yurochkin et al. 2019 and Wang et al. 2020: each class's images are split over
  the clients by proportions drawn from Dirichlet(`DIRICHLET_ALPHA`); see `_dirichlet`.

Within a client of `iid`, `shards` or `dirichlet` the images are shuffled (seeded), so
minibatches mix its classes. `prepare` writes the plan to `MODEL_DIR/partitions.json`:
the settings that made it and, per client, its id, size, label histogram and the SHA-256
of its index list, so every process can rebuild the same clients and prove it did.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from fedsim import config
from fedsim.data import listing
from fedsim.data.mnist import DataError

FILE = "partitions.json"
FORMAT = 1
CLASSES = 10  # MNIST's digits 0-9
DIRICHLET_DRAWS = 100  # Dirichlet draws tried before the minimum is enforced by moving images

# Per PARTITION, the settings that define its plan (and so must match partitions.json).
PARTITION_KEYS: dict[str, tuple[str, ...]] = {
    "slices": ("PARTITION", "SEED", "NUM_IMAGES_TRAIN", "CLIENT_SLICES"),
    "iid": ("PARTITION", "SEED", "NUM_CLIENTS"),
    "shards": ("PARTITION", "SEED", "NUM_CLIENTS", "SHARDS_PER_CLIENT"),
    "dirichlet": ("PARTITION", "SEED", "NUM_CLIENTS", "DIRICHLET_ALPHA"),
}


class PartitionError(DataError, ValueError):
    """A plan or plan file that cannot be used; the one-line message says where and why."""


@dataclass(frozen=True, eq=False)
class Part:
    """One logical client: its id and the training images it owns, in training order."""

    id: str  # "client-1", "client-2", ... in plan order
    indices: np.ndarray  # int64, read-only, into the training set
    slices: tuple[int, int] | None = None  # slices mode: inclusive 1-based slice range

    def __post_init__(self) -> None:
        indices = np.array(self.indices, dtype=np.int64)  # a private copy
        indices.setflags(write=False)
        object.__setattr__(self, "indices", indices)

    @cached_property
    def sha256(self) -> str:
        return digest(self.indices)


def digest(indices: np.ndarray) -> str:
    """Hex SHA-256 of the indices as little-endian int64 bytes, in their order."""
    indices = np.asarray(indices)
    if indices.ndim != 1 or (indices.size and indices.dtype.kind not in "iu"):
        raise PartitionError(f"indices must be a 1-D integer array, not {indices.dtype}")
    return hashlib.sha256(indices.astype("<i8").tobytes()).hexdigest()


def plan_settings(settings: config.Settings) -> dict[str, object]:
    """The settings that define the plan of `settings.partition`, JSON-friendly."""
    resolved = settings.to_dict()  # CLIENT_SLICES resolved, e.g. "1-4 5-8 9-12"
    return {key: resolved[key] for key in PARTITION_KEYS[settings.partition]}


# --- the rules -------------------------------------------------------------------------


def make(plan: Mapping[str, object], labels: np.ndarray) -> tuple[Part, ...]:
    """The logical clients of `plan` over the training set whose labels are `labels`."""
    partition = _check_plan(plan, "plan")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or labels.dtype.kind not in "iu":
        raise PartitionError(f"labels must be a non-empty 1-D integer array, not {labels.shape}")
    if labels.min() < 0 or labels.max() >= CLASSES:
        raise PartitionError(f"labels must lie in 0-{CLASSES - 1}, found {labels.max()}")
    if partition == "slices":
        return _slices(plan, len(labels))
    rng = np.random.default_rng(int(plan["SEED"]))
    k = int(plan["NUM_CLIENTS"])
    if partition == "iid":
        if k > len(labels):
            raise PartitionError(f"NUM_CLIENTS={k} is more than the {len(labels)} images")
        groups = np.array_split(rng.permutation(len(labels)), k)
    elif partition == "shards":
        groups = _shards(labels, k, int(plan["SHARDS_PER_CLIENT"]), rng)
    else:
        groups = _dirichlet(labels, k, float(plan["DIRICHLET_ALPHA"]), rng)
    # Seeded shuffle inside each client so its minibatches mix classes.
    return tuple(Part(f"client-{i + 1}", rng.permutation(g)) for i, g in enumerate(groups))


def _slices(plan: Mapping[str, object], n: int) -> tuple[Part, ...]:
    size = int(plan["NUM_IMAGES_TRAIN"])
    try:
        ranges = config.parse_slices(str(plan["CLIENT_SLICES"]), n // size)
    except ValueError as exc:
        raise PartitionError(f"CLIENT_SLICES={plan['CLIENT_SLICES']!r}: {exc}") from None
    return tuple(
        Part(f"client-{i + 1}", np.arange((lo - 1) * size, hi * size), (lo, hi))
        for i, (lo, hi) in enumerate(ranges)
    )


def _shards(labels: np.ndarray, k: int, per_client: int, rng: np.random.Generator) -> list:
    count = k * per_client
    if len(labels) % count:
        raise PartitionError(
            f"NUM_CLIENTS x SHARDS_PER_CLIENT = {count} shards do not divide {len(labels)} images"
        )
    shards = np.argsort(labels, kind="stable").reshape(count, -1)  # (shards, shard size)
    dealt = rng.permutation(count).reshape(k, per_client)  # (clients, shards per client)
    return [shards[row].ravel() for row in dealt]


def _dirichlet(labels: np.ndarray, k: int, alpha: float, rng: np.random.Generator) -> list:
    """Split each class over the k clients by proportions p ~ Dirichlet(alpha, ..., alpha).

    Class c's n_c images go to client j in the count floor(n_c P_j) - floor(n_c P_{j-1}),
    P the cumulative sum of p. Every client must end with at least
    `config.MIN_CLIENT_SAMPLES` images: the whole draw (all classes) is repeated up to
    `DIRICHLET_DRAWS` times until one satisfies this. If none does (tiny alpha, many
    clients), the last draw is fixed up deterministically: while some client is short,
    the first short client takes what it lacks from the currently largest client (the
    first one on a tie), from that client's highest classes first, never taking it below
    the minimum itself.
    """
    minimum = config.MIN_CLIENT_SAMPLES
    if k * minimum > len(labels):
        raise PartitionError(
            f"NUM_CLIENTS={k} clients of at least {minimum} images need more than "
            f"the {len(labels)} images"
        )
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(CLASSES)]
    for _ in range(DIRICHLET_DRAWS):
        counts = np.zeros((k, CLASSES), np.int64)  # (clients, classes)
        for c, members in enumerate(by_class):
            cuts = np.floor(np.cumsum(rng.dirichlet(np.full(k, alpha))) * len(members))
            cuts = np.clip(cuts.astype(np.int64), 0, len(members))
            counts[:, c] = np.diff(np.concatenate(([0], cuts[:-1], [len(members)])))
        if counts.sum(axis=1).min() >= minimum:
            break
    else:
        _raise_to_minimum(counts, minimum)
    groups: list[list[np.ndarray]] = [[] for _ in range(k)]
    for c, members in enumerate(by_class):
        for j, part in enumerate(np.split(members, np.cumsum(counts[:, c])[:-1])):
            groups[j].append(part)
    return [np.concatenate(g) for g in groups]


def _raise_to_minimum(counts: np.ndarray, minimum: int) -> None:
    """Move images (in place, per class) from the largest clients until all have `minimum`."""
    totals = counts.sum(axis=1)
    while (short := np.flatnonzero(totals < minimum)).size:
        taker, giver = short[0], int(np.argmax(totals))
        moved = min(minimum - totals[taker], totals[giver] - minimum)
        for c in range(CLASSES - 1, -1, -1):
            step = min(moved, counts[giver, c])
            counts[giver, c] -= step
            counts[taker, c] += step
            totals[giver] -= step
            totals[taker] += step
            moved -= step


def slice_indices(part: Part, slice_no: int, num_images_train: int) -> np.ndarray:
    """Slices mode: the images of slice `slice_no` (one of `part.slices`) of that client."""
    if part.slices is None:
        raise PartitionError(f"{part.id} has no slices: its plan is not PARTITION=slices")
    lo, hi = part.slices
    if not lo <= slice_no <= hi:
        raise PartitionError(f"slice {slice_no} is not in {part.id}'s slices {lo}-{hi}")
    start = (slice_no - lo) * num_images_train
    return part.indices[start : start + num_images_train]


# --- the plan file ---------------------------------------------------------------------


def manifest(plan: Mapping[str, object], parts: Sequence[Part], labels: np.ndarray) -> dict:
    """The content of partitions.json for `parts`, made by `plan` from `labels`."""
    partition = _check_plan(plan, "plan")
    labels = np.asarray(labels)
    clients = []
    for part in parts:
        histogram = np.bincount(labels[part.indices], minlength=CLASSES)
        entry = {
            "id": part.id,
            "samples": len(part.indices),
            "labels": [int(n) for n in histogram],
            "sha256": part.sha256,
        }
        if part.slices is not None:
            entry["slices"] = list(part.slices)
        clients.append(entry)
    return {
        "format": FORMAT,
        "settings": {key: plan[key] for key in PARTITION_KEYS[partition]},
        "train_images": len(labels),
        "clients": clients,
    }


def write(model_dir: Path, content: dict) -> Path:
    """Write the manifest to MODEL_DIR/partitions.json atomically; returns the path."""
    return listing.write(model_dir, FILE, content)


def read(model_dir: Path) -> dict:
    """MODEL_DIR/partitions.json, checked; PartitionError names the file and the fault."""
    content = listing.read(model_dir, FILE, PartitionError)
    try:
        _check_manifest(content)
    except PartitionError as exc:
        raise PartitionError(f"{model_dir / FILE}: {exc}") from None
    return content


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_plan(plan: object, where: str) -> str:
    """The plan's PARTITION, once every key it needs is present and of the right type."""
    if not isinstance(plan, Mapping):
        raise PartitionError(f"{where} must be an object of settings")
    partition = plan.get("PARTITION")
    if partition not in PARTITION_KEYS:
        raise PartitionError(
            f"{where} PARTITION is {partition!r}, not one of {', '.join(PARTITION_KEYS)}"
        )
    for key in PARTITION_KEYS[partition]:
        value = plan.get(key)
        if key == "PARTITION":
            continue
        if key == "CLIENT_SLICES":
            ok = isinstance(value, str) and bool(value.strip())
        elif key == "DIRICHLET_ALPHA":
            ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
            ok = ok and np.isfinite(value)
        else:
            ok = _is_int(value) and value >= (0 if key == "SEED" else 1)
        if not ok:
            raise PartitionError(f"{where} {key} is {value!r}, which cannot make a plan")
    extra = sorted(set(plan) - set(PARTITION_KEYS[partition]))
    if extra:
        raise PartitionError(f"{where} has keys that {partition} does not use: {extra}")
    return partition


def _check_manifest(content: object) -> None:
    if not isinstance(content, dict):
        raise PartitionError("not a JSON object")
    if content.get("format") != FORMAT:
        raise PartitionError(f"format is {content.get('format')!r}, expected {FORMAT}")
    partition = _check_plan(content.get("settings"), "settings:")
    train = content.get("train_images")
    if not _is_int(train) or train < 1:
        raise PartitionError(f"train_images is {train!r}, not a positive integer")
    clients = content.get("clients")
    if not isinstance(clients, list) or not clients:
        raise PartitionError("clients is not a non-empty list")
    if partition != "slices" and len(clients) != content["settings"]["NUM_CLIENTS"]:
        raise PartitionError(
            f"{len(clients)} clients, but NUM_CLIENTS is {content['settings']['NUM_CLIENTS']}"
        )
    keys = {"id", "samples", "labels", "sha256"} | ({"slices"} if partition == "slices" else set())
    for i, client in enumerate(clients):
        where = f"clients[{i}]"
        if not isinstance(client, dict) or set(client) != keys:
            raise PartitionError(f"{where} must have exactly the keys {sorted(keys)}")
        if client["id"] != f"client-{i + 1}":
            raise PartitionError(f"{where} id is {client['id']!r}, expected 'client-{i + 1}'")
        samples, histogram = client["samples"], client["labels"]
        if not _is_int(samples) or not 1 <= samples <= train:
            raise PartitionError(f"{where} samples is {samples!r}, not in 1-{train}")
        if (
            not isinstance(histogram, list)
            or len(histogram) != CLASSES
            or not all(_is_int(n) and n >= 0 for n in histogram)
            or sum(histogram) != samples
        ):
            raise PartitionError(f"{where} labels is not {CLASSES} counts summing to {samples}")
        sha = client["sha256"]
        if not isinstance(sha, str) or len(sha) != 64 or set(sha) - set("0123456789abcdef"):
            raise PartitionError(f"{where} sha256 is {sha!r}, not 64 lowercase hex digits")
        if partition == "slices":
            span = client["slices"]
            if (
                not (isinstance(span, list) and len(span) == 2 and all(_is_int(s) for s in span))
                or not 1 <= span[0] <= span[1]
            ):
                raise PartitionError(f"{where} slices is {span!r}, not a range [first, last]")


def _shown(value: object) -> str:
    return repr(value) if isinstance(value, str) and " " in value else str(value)


def differences(content: Mapping, settings: config.Settings) -> list[str]:
    """One phrase per plan setting in which `settings` differ from the manifest; [] if none.

    When PARTITION differs, only the settings the two plans share are compared besides it.
    """
    here, there = plan_settings(settings), content["settings"]
    return [
        f"{key} is {_shown(here[key])} here, {_shown(there[key])} in {FILE}"
        for key in here
        if key in there and here[key] != there[key]
    ]


def summary(content: Mapping) -> str:
    """One line for the log, e.g. 'plan: shards (2 per client), 100 clients of 600 samples, ...'."""
    plan, clients = content["settings"], content["clients"]
    partition = plan["PARTITION"]
    name = {
        "slices": f"slices {plan.get('CLIENT_SLICES')} of {plan.get('NUM_IMAGES_TRAIN')} images",
        "iid": "iid",
        "shards": f"shards ({plan.get('SHARDS_PER_CLIENT')} per client)",
        "dirichlet": f"dirichlet (alpha {plan.get('DIRICHLET_ALPHA')})",
    }[partition]
    sizes = [c["samples"] for c in clients]
    lo, hi, used = min(sizes), max(sizes), sum(sizes)
    size = f"{used / len(sizes):.0f} samples" + ("" if lo == hi else f" on average ({lo}-{hi})")
    labels = sum(sum(1 for n in c["labels"] if n) for c in clients) / len(clients)
    line = f"plan: {name}, {len(clients)} clients of {size}, "
    line += f"{labels:.1f} labels per client on average"
    if used < content["train_images"]:
        line += f", {used} of {content['train_images']} images used"
    return line
