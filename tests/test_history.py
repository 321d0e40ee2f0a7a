"""aggregator/history.py: appending an entry reads only the file's last byte."""

from __future__ import annotations

from pathlib import Path

from fedsim.aggregator import history


def entry(version: int) -> dict:
    return {"version": version, "accuracy": 0.5, "loss": 1.0}


def test_entries_are_appended_one_a_line_from_an_absent_or_empty_file(tmp_path: Path) -> None:
    history.append(tmp_path, entry(0))  # no file yet
    history.append(tmp_path, entry(1))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / history.FILE).write_text("")
    history.append(tmp_path / "empty", entry(2))

    assert (tmp_path / history.FILE).read_text().splitlines()[0].startswith('{"version":0')
    assert len((tmp_path / history.FILE).read_text().splitlines()) == 2
    assert (tmp_path / "empty" / history.FILE).read_text().startswith('{"version":2')


def test_a_torn_last_line_is_left_on_a_line_of_its_own(tmp_path: Path) -> None:
    (tmp_path / history.FILE).write_text('{"version":0,"accuracy":0.1,"loss":2.3}\n{"vers')

    history.append(tmp_path, entry(1))

    lines = (tmp_path / history.FILE).read_text().splitlines()
    assert lines[1] == '{"vers' and lines[2].startswith('{"version":1')
    assert [e["version"] for e in history.read(tmp_path)] == [0, 1]
