"""A sweep starts only on an idle machine, or says in its report that it did not."""

from __future__ import annotations

import json
import os

import pytest

from fedsim.experiment import __main__ as cli
from fedsim.experiment.outcome import Raw

TINY = """
name = "tiny"
seeds = [1, 2]
workers = 1
target = 0.5
[settings]
ROUNDS = 2
[grid]
AGGREGATION = ["fedavg", "fedprox"]
"""


class Instant:
    """An engine whose runs end at once with two evaluations."""

    name = "local"

    def __init__(self) -> None:
        self.ran: list[str] = []

    def prepare(self) -> None:
        pass

    def run(self, job, on_entry):
        self.ran.append(job.label)
        entries = [{"version": v, "round": v or None, "accuracy": 0.4 + v / 5, "loss": 1.0,
                    "time": f"2026-01-01T00:00:0{v}+00:00"} for v in range(3)]  # fmt: skip
        for entry in entries:
            on_entry(entry)
        return Raw("finished", 1767225600.0, 2.0, entries)


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    """Run the command line on TINY with the 1-minute load given; the engine and results."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    engine = Instant()
    monkeypatch.setattr(cli, "engine_for", lambda name, root: engine)

    def run(load: float, *flags: str) -> int:
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
        return cli.main([str(path), "--results", str(tmp_path / "results"), *flags])

    return run, engine, tmp_path / "results" / "tiny"


def test_a_sweep_refuses_to_start_above_a_load_of_one_and_runs_nothing(sweep, capsys):
    run, engine, folder = sweep
    with pytest.raises(SystemExit) as refused:
        run(1.73)
    assert str(refused.value) == (
        "experiment tiny: the 1-minute load is 1.73, above 1: wait until the machine is "
        "idle, or pass --force (figures marked loaded)"
    )
    assert engine.ran == [] and not folder.exists()


def test_runs_of_a_sweep_started_idle_say_so_in_their_rows_and_summary(sweep):
    run, engine, folder = sweep
    assert run(0.42) == 0
    assert len(engine.ran) == 4
    rows = [json.loads(p.read_text()) for p in sorted(folder.glob("runs/*/*/result.json"))]
    assert [(r["sweep_load_start"], r["loaded"]) for r in rows] == [(0.42, False)] * 4
    summary = (folder / "summary.md").read_text()
    assert "Each sweep started on an idle machine (1-minute load at most 0.42)." in summary
    assert "**Loaded:**" not in summary


def test_a_forced_sweep_marks_its_runs_loaded_and_a_resumed_one_keeps_the_earlier_marks(sweep):
    run, engine, folder = sweep
    assert run(0.3, "--dry-run") == 0 and engine.ran == []  # nothing checked, nothing run
    assert run(2.5, "--force") == 0
    rows = [json.loads(p.read_text()) for p in sorted(folder.glob("runs/*/*/result.json"))]
    assert {(r["sweep_load_start"], r["loaded"]) for r in rows} == {(2.5, True)}
    summary = (folder / "summary.md").read_text()
    assert (
        "**Loaded:** 4 of 4 runs come from a sweep forced to start above a 1-minute load "
        "of 1.0 (up to 2.50)" in summary
    )
    assert "loaded" in (folder / "runs.csv").read_text().splitlines()[0].split(",")

    # One run is lost; the same command on an idle machine runs it alone and marks it so.
    lost = sorted(folder.glob("runs/*/*/result.json"))[1]
    lost.unlink()
    assert run(0.3) == 0
    assert len(engine.ran) == 5
    rows = [json.loads(p.read_text()) for p in sorted(folder.glob("runs/*/*/result.json"))]
    assert [r["loaded"] for r in rows] == [True, False, True, True]
    assert "**Loaded:** 3 of 4 runs" in (folder / "summary.md").read_text()
