"""aggregator/tasks/roster.py: the plan's clients as numpy columns, Clients made when asked."""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest

from fedsim.aggregator import persistence
from fedsim.aggregator.tasks import Client
from fedsim.aggregator.tasks.roster import Roster, by_number, number_of
from helpers import write_plan

# Per client: samples int32 (4 B), the SHA-256 as 32 raw bytes, 10 label counts as int32.
BYTES_PER_CLIENT = 4 + 32 + 10 * 4


def records(manifest: dict) -> list[Client]:
    """The clients of partitions.json as records, the way the aggregator used to hold them."""
    return [
        Client(i, c["samples"], c["sha256"], tuple(c["slices"]) if "slices" in c else None)
        for i, c in enumerate(manifest["clients"], 1)
    ]


@pytest.mark.parametrize(
    "plan",
    [
        {"PARTITION": "iid", "NUM_CLIENTS": 37},
        {"PARTITION": "dirichlet", "NUM_CLIENTS": 20, "DIRICHLET_ALPHA": 0.3},
        {"PARTITION": "slices", "CLIENT_SLICES": "1-4 5-8 9-12"},
    ],
)
def test_a_roster_gives_the_clients_and_label_counts_of_the_plan(make_settings, plan) -> None:
    manifest = write_plan(make_settings(**plan))

    roster = Roster.of(manifest["clients"])

    assert list(roster) == records(manifest)
    assert roster[-1] == records(manifest)[-1] and roster[1:3] == records(manifest)[1:3]
    for n, entry in enumerate(manifest["clients"], 1):
        assert roster.label_counts(n) == entry["labels"]
        assert roster.by_number[n] == roster[n - 1]
        assert roster.samples_by_id[f"client-{n}"] == entry["samples"]


def test_a_roster_looks_up_only_the_plans_numbers() -> None:
    roster = Roster.of_clients([Client(n, 10 * n, f"{n:064x}") for n in (1, 2, 3)])
    clients = roster.by_number

    assert list(clients) == [1, 2, 3] and len(clients) == 3
    assert 3 in clients and np.int64(2) in clients
    for outside in (0, 4, -1, True, "1", 1.0):
        assert outside not in clients
    with pytest.raises(KeyError):
        clients[4]
    with pytest.raises(IndexError):
        roster[3]
    assert dict(roster.samples_by_id) == {"client-1": 10, "client-2": 20, "client-3": 30}
    for outside in ("client-0", "client-4", "client-01", "client-1 ", "typed", "client-²"):
        assert outside not in roster.samples_by_id
    assert dict(by_number(list(roster))) == dict(clients)  # a list of clients: a dict of them


def test_a_roster_is_numbered_from_one_in_order() -> None:
    with pytest.raises(ValueError, match="client-2 is at position 1"):
        Roster.of_clients([Client(2, 10, "0" * 64)])


@pytest.mark.parametrize(
    ("client_id", "count", "number"),
    [("client-1", 5, 1), ("client-5", 5, 5), ("client-6", 5, None), ("client-0", 5, None),
     ("client-007", 9, None), ("client-", 5, None), ("7", 9, None), (7, 9, None)],
)  # fmt: skip
def test_number_of_reads_one_spelling_of_a_planned_client(client_id, count, number) -> None:
    assert number_of(client_id, count) == number


def test_the_plan_of_10000_clients_is_held_in_under_a_megabyte(make_settings) -> None:
    settings = make_settings(PARTITION="iid", NUM_CLIENTS=10_000, CLIENTS_PER_ROUND=100)
    write_plan(settings)
    gc.collect()
    tracemalloc.start()
    try:
        manifest, roster = persistence.load_plan(settings)
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()  # what load_plan's result keeps
    finally:
        tracemalloc.stop()

    assert "clients" not in manifest and len(roster) == 10_000
    assert roster.nbytes == BYTES_PER_CLIENT * 10_000
    # The columns and a few kB of objects around them, where a dict per client took ~0.5 kB.
    assert held < BYTES_PER_CLIENT * 10_000 + 64_000
