"""fedsim.aggregator.ledger: numbers of aggregated updates, dedup memory, what a checkpoint keeps."""

from __future__ import annotations

from fedsim.aggregator import ledger
from fedsim.aggregator.ledger import Ledger


def test_restored_ids_are_the_newest_numbers_in_the_checkpoints_version() -> None:
    book = Ledger(["a", "b", "c"], total=10, version=4, saved_at="t0")

    assert [book.get(i) for i in "abc"] == [(4, 8), (4, 9), (4, 10)]
    assert book.first() == 8 and book.unsaved() == 0
    assert book.last_checkpoint == {"version": 4, "time": "t0"}


def test_each_update_gets_the_next_number_and_counts_as_unsaved() -> None:
    book = Ledger([], total=0, version=0, saved_at="t0")

    assert book.first() == 1  # none remembered: the next number
    assert (book.add("x", 1), book.add("y", 1)) == (1, 2)
    assert book.number("y") == 2 and book.number("z") is None
    assert book.unsaved() == 2

    book.saved(version=1, total=2, time="t1")

    assert book.unsaved() == 0 and book.saved_version == 1
    assert book.last_checkpoint == {"version": 1, "time": "t1"}


def test_the_oldest_ids_are_forgotten_beyond_remembered_ids(monkeypatch) -> None:
    monkeypatch.setattr(ledger, "REMEMBERED_IDS", 2)
    book = Ledger([], total=0, version=0, saved_at="t0")

    for update_id in "abc":
        book.add(update_id, 1)

    assert book.get("a") is None and book.number("c") == 3
    assert book.first() == 2


def test_a_checkpoint_keeps_the_newest_ids_within_count_and_bytes(monkeypatch) -> None:
    book = Ledger([f"id-{n}" for n in range(5)], total=5, version=1, saved_at="t0")
    monkeypatch.setattr(ledger, "SAVED_IDS", 3)
    assert book.recent() == ["id-2", "id-3", "id-4"]

    # 2 + (len('"id-4"') + 2) * 2 = 18 bytes hold two ids, not three.
    monkeypatch.setattr(ledger, "SAVED_IDS_BYTES", 18)
    assert book.recent() == ["id-3", "id-4"]


def test_ids_json_escapes_count_in_the_bytes_a_checkpoint_keeps(monkeypatch) -> None:
    # json.dumps('a"b') is "a\"b" with its quotes, 6 bytes; json.dumps("é") is "\u00e9", 8.
    book = Ledger(["plain", 'a"b', "é"], total=3, version=1, saved_at="t0")
    monkeypatch.setattr(ledger, "SAVED_IDS_BYTES", 2 + (8 + 2) + (6 + 2))
    assert book.recent() == ['a"b', "é"]
    monkeypatch.setattr(ledger, "SAVED_IDS_BYTES", 2 + (8 + 2) + (6 + 2) - 1)
    assert book.recent() == ["é"]
