"""experiment/local.py's reading of a run's history as it grows (HistoryTail)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedsim.experiment.local import HistoryTail, read_history


def line(version: int, accuracy: float = 0.5) -> str:
    return json.dumps({"version": version, "accuracy": accuracy, "loss": 1.0}) + "\n"


def test_a_tail_parses_what_was_appended_and_waits_for_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    tail = HistoryTail(path)
    assert tail() == []  # no file yet

    path.write_text(line(0) + line(1))
    assert [e["version"] for e in tail()] == [0, 1]
    with path.open("a") as f:
        f.write(line(2) + '{"version": 3, "acc')  # version 3 is being appended
    assert [e["version"] for e in tail()] == [0, 1, 2]
    with path.open("a") as f:
        f.write('uracy": 0.9, "loss": 0.1}\n' + line(1, accuracy=0.7) + "not json\n")
    got = tail()

    assert [e["version"] for e in got] == [0, 1, 2, 3]
    assert got[1]["accuracy"] == 0.7 and got[3]["accuracy"] == 0.9  # a version made again
    assert got == read_history(path)  # the same as reading the whole file


def test_a_history_replaced_by_a_restart_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    tail = HistoryTail(path)
    path.write_text(line(0) + line(1) + line(2))
    assert len(tail()) == 3

    # A restart drops the versions it lost: the file is replaced (a new inode), then grows.
    new = tmp_path / "new"
    new.write_text(line(0) + line(1, accuracy=0.6) + line(2, accuracy=0.8) + line(3))
    os.replace(new, path)

    assert [(e["version"], e["accuracy"]) for e in tail()] == [
        (0, 0.5), (1, 0.6), (2, 0.8), (3, 0.5),
    ]  # fmt: skip
