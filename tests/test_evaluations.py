"""fedsim.aggregator.evaluations: the versions waiting for a score as one record each, their
bound, and the history entry a score becomes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from unittest.mock import create_autospec

import pytest

from fedsim.aggregator import history
from fedsim.aggregator.evaluations import MAX_WAITING_EVALUATIONS, Evaluations
from fedsim.aggregator.events import Events
from fedsim.aggregator.metrics import Recorder
from fedsim.aggregator.snapshot import Snapshot
from fedsim.aggregator.strategies import Refused
from helpers import tensors


class FakeQueue:
    """The evaluation side of the task queue: versions wanted, oldest dropped first."""

    def __init__(self) -> None:
        self.wanted: list[int] = []
        self.recorded: list[int] = []
        self.workers: dict = {}
        self.finished = False
        self.run_clock = lambda: 12.3456  # the run's clock, as the entries' sim_seconds show

    def want_evaluation(self, version: int) -> None:
        self.wanted.append(version)

    def drop_evaluations(self, keep: int) -> list[int]:
        dropped, self.wanted = self.wanted[:-keep], self.wanted[-keep:]
        return dropped

    def check_evaluation(self, task_id: str, lease: str) -> int:
        return int(task_id.removeprefix("eval.v"))

    def record_evaluation(self, task_id: str, lease: str, version: int) -> None:
        self.recorded.append(version)
        self.wanted.remove(version)


def snap(version: int, samples: int = 100) -> Snapshot:
    return Snapshot.of(tensors("mlp"), version, samples, "mlp")


@pytest.fixture
def core(tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(
        settings=SimpleNamespace(model_dir=tmp_path),
        queue=FakeQueue(),
        snapshot=snap(0),
        events=Events(lambda: 1_700_000_000.0),
        metrics=create_autospec(Recorder, instance=True),
        stamp=lambda: "2026-01-01T00:00:00+00:00",
    )


def test_a_waiting_version_is_one_record_of_what_its_entry_will_say(core) -> None:
    evaluations = Evaluations(core, [], attackers=[])
    for client in ("client-3", "client-1", "client-3"):
        evaluations.saw(client)

    evaluations.want(snap(4, samples=400), round_no=2, updates=7)

    waiting = evaluations.waiting[4]
    assert (waiting.round, waiting.updates, waiting.clients) == (2, 7, ["client-1", "client-3"])
    assert evaluations.snapshot_of(4).samples == 400
    assert core.queue.wanted == [4]
    evaluations.want(snap(5), None, 8)
    assert evaluations.waiting[5].clients == []  # the clients were counted in version 4


def test_at_most_max_waiting_evaluations_wait_the_oldest_dropped(core) -> None:
    evaluations = Evaluations(core, [], attackers=[])

    for version in range(1, MAX_WAITING_EVALUATIONS + 3):
        evaluations.want(snap(version), None, version)

    assert len(evaluations) == MAX_WAITING_EVALUATIONS
    assert sorted(evaluations.waiting) == list(range(3, MAX_WAITING_EVALUATIONS + 3))
    assert evaluations.snapshot_of(1) is None


def test_a_score_becomes_the_history_entry_and_stops_the_wait(core, tmp_path) -> None:
    evaluations = Evaluations(core, [], attackers=["client-2"])
    evaluations.saw("client-1")
    evaluations.saw("client-2")
    evaluations.want(snap(3, samples=300), round_no=1, updates=2)

    entry = evaluations.record("eval.v3", "lease", 0.91234567, 0.25, "wk-1")

    assert entry == {
        "version": 3,
        "round": 1,
        "time": "2026-01-01T00:00:00+00:00",
        "accuracy": 0.912346,
        "loss": 0.25,
        "samples": 300,
        "updates": 2,
        "clients": ["client-1", "client-2"],
        "sim_seconds": 12.346,  # the run's clock when v3 was made, to the millisecond
        "attackers": ["client-2"],
    }
    assert history.read(tmp_path) == [entry] and evaluations.last() == entry
    assert evaluations.waiting == {} and core.queue.recorded == [3]
    core.metrics.evaluation.assert_called_once_with(accuracy=0.91234567, loss=0.25, version=3)
    assert core.events.rows()[-1]["text"] == "round 1 (v3): test accuracy 0.9123, loss 0.2500"


def test_a_score_of_a_version_made_again_replaces_its_entry(core) -> None:
    old = {"version": 3, "round": None, "accuracy": 0.5, "loss": 1.0}
    evaluations = Evaluations(core, [old, {"version": 5, "accuracy": 0.6}], attackers=[])
    evaluations.want(snap(3), None, 1)

    evaluations.record("eval.v3", "lease", 0.8, 0.4, "wk-1")

    assert [(e["version"], e["accuracy"]) for e in evaluations.entries] == [(3, 0.8), (5, 0.6)]
    assert evaluations.scored(3) and not evaluations.scored(4)


def test_a_history_that_cannot_be_written_is_503_and_the_version_still_waits(
    core, tmp_path, monkeypatch
) -> None:
    evaluations = Evaluations(core, [], attackers=[])
    evaluations.saw("client-1")
    evaluations.want(snap(2), None, 1)

    def full_disk(model_dir, entry):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(history, "append", full_disk)
    with pytest.raises(Refused) as refused:
        evaluations.record("eval.v2", "lease", 0.9, 0.3, "wk-1")

    assert (refused.value.code, refused.value.status) == ("unavailable", 503)
    assert evaluations.waiting[2].clients == ["client-1"]  # a retry records the same entry
    assert evaluations.entries == [] and core.queue.recorded == []
    core.metrics.evaluation.assert_not_called()


def test_the_last_score_finishes_the_run(core) -> None:
    evaluations = Evaluations(core, [], attackers=[])
    evaluations.want(snap(0), None, 0)
    core.queue.finished = True

    evaluations.record("eval.v0", "lease", 0.9, 0.3, "wk-1")

    core.metrics.set_finished.assert_called_once_with(True)
    assert core.events.rows()[-1]["kind"] == "finished"


def test_a_page_is_the_entries_after_a_version_in_order_and_copies(core) -> None:
    scored = [{"version": v, "accuracy": v / 10, "loss": 1.0, "clients": []} for v in (0, 3, 1, 2)]
    evaluations = Evaluations(core, scored, attackers=[])  # version 2 scored after 3

    page = evaluations.page(after=0, limit=2)

    assert [e["version"] for e in page] == [1, 2, 3]  # the page of 2 and one to say "more"
    assert [e["version"] for e in evaluations.page()] == [0, 1, 2, 3]
    assert [e["version"] for e in evaluations.page(after=2, limit=5)] == [3]
    page[0]["clients"] = ["client-9"]  # a copy: the history is not changed through it
    assert evaluations.page(after=0, limit=0)[0]["clients"] == []
