"""The client's loop against a fake aggregator and a fake learner: no TensorFlow, no network."""

from __future__ import annotations

import logging
from itertools import count

import numpy as np
import pytest

from conftest import FakeClock
from fedsim import models
from fedsim.client.identity import Identity
from fedsim.client.loop import POLL_SECONDS, SETTLE_SLACK, AggregatorUnreachable, Client
from fedsim.client.training import Trained, threads_for
from fedsim.client.transport import Looked, Pulled, Pushed


def mlp_weights(value: float) -> dict[str, np.ndarray]:
    return {name: np.full(shape, value, np.float32) for name, shape in models.SHAPES["mlp"]}


class FakeLearner:
    """Training adds 1 to every weight, so the weights show what the client started from."""

    def __init__(self) -> None:
        self.weights = mlp_weights(0.0)
        self.trained: list[int] = []

    def get_weights(self):
        return {k: v.copy() for k, v in self.weights.items()}

    def set_weights(self, tensors):
        self.weights = {k: v.copy() for k, v in tensors.items()}

    def train(self, slice_no: int) -> Trained:
        self.trained.append(slice_no)
        self.weights = {k: v + 1 for k, v in self.weights.items()}
        return Trained(slice_no, 100, 0.5, 0.9, 0.01)


class FakeTransport:
    """Scripted pulls, pushes and lookups; status answers from a list, repeating the last.

    Lookups answer from `lookups` in order, then "saved".
    """

    base_url = "http://fake"

    def __init__(self, pulls=(), pushes=(), statuses=({"version": 0},), lookups=()) -> None:
        self.pulls, self.pushes, self.statuses = list(pulls), list(pushes), list(statuses)
        self.lookups = list(lookups)
        self.pushed: list[tuple[dict, dict]] = []
        self.looked: list[tuple[str, int | None]] = []
        self.pull_calls = 0

    def lookup(self, update_id, seq=None, *, attempts=None) -> Looked:
        self.looked.append((update_id, seq))
        return self.lookups.pop(0) if self.lookups else Looked("saved", 0)

    def health(self):
        return {"status": "ok", "version": 0}

    def status(self, *, attempts=None):
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def pull(self) -> Pulled:
        self.pull_calls += 1
        return self.pulls.pop(0)

    def push(self, tensors, meta) -> Pushed:
        self.pushed.append((tensors, dict(meta)))
        return self.pushes.pop(0)


def ok_pull(version: int, value: float) -> Pulled:
    return Pulled(0, mlp_weights(value), {"version": str(version)})


FAILED_PULL = Pulled(1, error="ConnectionError: down")


def accepted(version: int, retries: int = 0, seq: int | None = None) -> Pushed:
    return Pushed(True, retries, version=version, status=200, seq=seq)


FAILED_PUSH = Pushed(False, 1, detail="HTTP 503")


def make_client(make_settings, link, *, first=1, last=3, clock=None, **settings):
    learner = FakeLearner()
    ids = (f"u{i}" for i in count())
    kwargs = {"clock": clock} if clock else {}
    slept: list[float] = []
    if clock is not None:
        kwargs["sleep"] = lambda s: (slept.append(s), clock.advance(s))
    else:
        kwargs["sleep"] = slept.append
    client = Client(
        make_settings(**settings),
        Identity(2, first, last, "test"),
        link,
        learner,
        new_update_id=lambda: next(ids),
        **kwargs,
    )
    return client, learner, slept


# --- async-weighted ------------------------------------------------------------------


def test_each_slice_is_pulled_trained_and_pushed(make_settings, caplog):
    link = FakeTransport(
        pulls=[ok_pull(0, 0), ok_pull(1, 10), ok_pull(2, 20)],
        pushes=[accepted(1), accepted(2, retries=1), accepted(3)],
    )
    client, learner, _ = make_client(make_settings, link)
    with caplog.at_level(logging.INFO, "fedsim.client"):
        summary = client.run_async()
    assert learner.trained == [1, 2, 3]
    assert [m["base_version"] for _, m in link.pushed] == [0, 1, 2]
    # Each push carries the weights trained from the model just pulled.
    assert [t["output/bias"][0] for t, _ in link.pushed] == [1.0, 11.0, 21.0]
    assert [m["update_id"] for _, m in link.pushed] == ["u0", "u1", "u2"]
    assert link.pushed[0][1]["slices"] == "1-3" and link.pushed[0][1]["num_samples"] == 100
    assert (summary.slices_done, summary.pushes_accepted, summary.pushes_failed) == (3, 3, 0)
    assert summary.retries == 1
    assert "client-2 pull  slice 2 version 1 (retries 0)" in caplog.text
    assert "client-2 push  slice 2 base 1 -> version 2 (retries 1)" in caplog.text
    assert "client-2 train slice 3 samples 100 loss 0.5000 acc 0.9000" in caplog.text


def test_a_failed_push_skips_the_next_pull_and_keeps_the_weights(make_settings):
    link = FakeTransport(
        pulls=[ok_pull(0, 0), ok_pull(2, 50)],
        pushes=[FAILED_PUSH, accepted(2), accepted(3)],
    )
    client, _learner, _ = make_client(make_settings, link)
    summary = client.run_async()
    # Pulls before slice 1 and slice 3, not before slice 2.
    assert link.pull_calls == 2
    # Slice 2 trained on top of slice 1's unsent weights (1 + 1), based on version 0.
    assert link.pushed[1][0]["output/bias"][0] == 2.0 and link.pushed[1][1]["base_version"] == 0
    assert link.pushed[2][0]["output/bias"][0] == 51.0
    assert (summary.pushes_accepted, summary.pushes_failed, summary.pulls_failed) == (2, 1, 0)
    assert summary.retries == 1
    line = summary.line("client-2", 3.25)
    assert line == (
        "client-2 done: 3 slices trained, pushes 2 accepted 1 failed, pulls 0 failed, "
        "re-pushed 0, 1 retries, 3.2s"
    )


def test_a_failed_pull_trains_on_the_weights_it_has(make_settings):
    link = FakeTransport(
        pulls=[ok_pull(4, 10), FAILED_PULL, ok_pull(9, 0)],
        pushes=[accepted(5), accepted(6), accepted(7)],
    )
    client, _learner, _ = make_client(make_settings, link)
    summary = client.run_async()
    assert link.pushed[1][0]["output/bias"][0] == 12.0  # 10 + 1 + 1: its own weights
    assert link.pushed[1][1]["base_version"] == 4  # the version those weights came from
    assert (summary.pulls_failed, summary.pushes_accepted, summary.slices_done) == (1, 3, 3)
    assert summary.retries == 1


def test_a_model_of_another_layout_stops_the_client(make_settings):
    wrong = Pulled(0, {"x": np.zeros(3, np.float32)}, {"version": "1"})
    client, _, _ = make_client(make_settings, FakeTransport(pulls=[wrong]))
    with pytest.raises(ValueError, match="not MODEL=mlp"):
        client.run_async()


def test_wait_ready_gives_up_with_a_clear_message(make_settings):
    class Down(FakeTransport):
        def health(self):
            return None

    clock = FakeClock(start=0.0)
    client, _, slept = make_client(make_settings, Down(), clock=clock)
    with pytest.raises(AggregatorUnreachable, match="AGGREGATOR_URL"):
        client.wait_ready(timeout=5)
    assert 5 <= sum(slept) <= 7


def test_wait_ready_follows_the_aggregators_strategy(make_settings):
    link = FakeTransport(statuses=[{"version": 3, "strategy": "fedavg"}])
    client, _, _ = make_client(make_settings, link)
    assert client.wait_ready() == "fedavg"


# --- fedavg ------------------------------------------------------------------------


def test_fedavg_one_slice_per_round_until_finished(make_settings, caplog):
    clock = FakeClock(start=0.0)
    link = FakeTransport(
        pulls=[ok_pull(0, 0), ok_pull(1, 0), ok_pull(2, 0)],
        pushes=[accepted(0), accepted(1), accepted(2)],
        statuses=[
            {"version": 0},  # round 1 starts
            {"version": 0},  # still waiting for the others
            {"version": 1},  # round 1 closed
            {"version": 1},
            {"version": 2},
            {"version": 2},
            {"version": 3, "round": {"finished": True}},
        ],
    )
    client, learner, _ = make_client(
        make_settings, link, first=4, last=5, clock=clock, AGGREGATION="fedavg"
    )
    with caplog.at_level(logging.INFO, "fedsim.client"):
        summary = client.run_fedavg()
    assert "client-2 push  slice 4 base 0 -> version 0 (retries 0) (round open)" in caplog.text
    assert learner.trained == [4, 5, 4]  # cycles through its range
    assert [m["base_version"] for _, m in link.pushed] == [0, 1, 2]
    assert summary.pushes_accepted == 3 and summary.rounds == 3


def test_fedavg_stale_update_pulls_again(make_settings):
    clock = FakeClock(start=0.0)
    stale = Pushed(False, 0, version=3, status=409, detail="base 2 is stale")
    finished = Pushed(False, 0, version=4, status=409, finished=True, detail="finished")
    link = FakeTransport(
        pulls=[ok_pull(2, 0), ok_pull(3, 0)],
        pushes=[stale, finished],
        statuses=[{"version": 2}, {"version": 3}],
    )
    client, _learner, _ = make_client(make_settings, link, clock=clock, AGGREGATION="fedavg")
    summary = client.run_fedavg()
    assert link.pull_calls == 2
    assert [m["base_version"] for _, m in link.pushed] == [2, 3]
    assert summary.pushes_accepted == 0 and summary.pushes_failed == 0
    assert summary.slices_done == 2


def test_fedavg_exits_when_the_run_is_already_finished(make_settings):
    link = FakeTransport(statuses=[{"version": 30, "finished": True}])
    client, learner, _ = make_client(make_settings, link, AGGREGATION="fedavg")
    summary = client.run_fedavg()
    assert learner.trained == [] and link.pull_calls == 0 and summary.slices_done == 0


def test_fedavg_repushes_an_accepted_update_the_aggregator_lost(make_settings, caplog):
    clock = FakeClock(start=0.0)
    link = FakeTransport(
        pulls=[ok_pull(5, 0)],
        pushes=[accepted(5), accepted(5)],
        statuses=[{"version": 5}] * 25 + [{"version": 6, "finished": True}],
        # Asked while the round is open: first still pending, then lost in a restart.
        lookups=[Looked("pending", 0), Looked("unknown", 0)],
    )
    client, _, _ = make_client(make_settings, link, clock=clock, AGGREGATION="fedavg")
    with caplog.at_level(logging.INFO, "fedsim.client"):
        summary = client.run_fedavg()
    assert len(link.pushed) == 2
    assert link.pushed[0][1]["update_id"] == link.pushed[1][1]["update_id"]
    assert summary.pushes_accepted == 1 and summary.repushed == 1  # the same update
    assert "client-2 re-push slice 1 (lost in an aggregator restart) -> version 5" in caplog.text
    assert client.unconfirmed == [] and summary.unconfirmed == 0


def test_fedavg_does_not_repush_an_update_its_round_holds(make_settings):
    clock = FakeClock(start=0.0)
    link = FakeTransport(
        pulls=[ok_pull(5, 0)],
        pushes=[accepted(5)],
        statuses=[{"version": 5}] * 25 + [{"version": 6, "finished": True}],
        lookups=[Looked("pending", 0)] * 10,
    )
    client, _, _ = make_client(make_settings, link, clock=clock, AGGREGATION="fedavg")
    client.run_fedavg()
    assert len(link.pushed) == 1
    assert len(link.looked) >= 3  # asked while waiting, and once at the end


def test_fedavg_retries_a_failed_push_while_the_round_is_open(make_settings):
    clock = FakeClock(start=0.0)
    link = FakeTransport(
        pulls=[ok_pull(1, 0)],
        pushes=[FAILED_PUSH, accepted(1)],
        statuses=[{"version": 1}] * 12 + [{"version": 2, "finished": True}],
    )
    client, _, _ = make_client(make_settings, link, clock=clock, AGGREGATION="fedavg")
    summary = client.run_fedavg()
    assert [m["update_id"] for _, m in link.pushed] == ["u0", "u0"]
    assert (summary.pushes_failed, summary.pushes_accepted) == (1, 1)


# --- accepted updates until they are saved --------------------------------------------


def test_saved_updates_are_dropped_applied_ones_kept(make_settings):
    clock = FakeClock(start=0.0)
    link = FakeTransport(
        pulls=[ok_pull(0, 0), ok_pull(1, 0), ok_pull(2, 0)],
        pushes=[accepted(1, seq=1), accepted(2, seq=2), accepted(3, seq=3)],
        lookups=[Looked("applied", 0, version=1, seq=1)],  # then "saved"
    )
    client, _, _ = make_client(make_settings, link, clock=clock)
    summary = client.run_async()
    # Before pull 2: u0 applied, kept. Before pull 3: u0 and u1 saved. At the end: u2.
    assert link.looked == [("u0", 1), ("u0", 1), ("u1", 2), ("u2", 3)]
    assert client.unconfirmed == [] and summary.unconfirmed == 0 and summary.repushed == 0
    assert len(link.pushed) == 3


def test_a_lost_update_is_pushed_again_once_with_the_same_update_id(make_settings, caplog):
    clock = FakeClock(start=0.0)
    link = FakeTransport(
        pulls=[ok_pull(0, 0), ok_pull(1, 0)],
        pushes=[accepted(1, seq=1), accepted(1, seq=1), accepted(2, seq=2)],
        lookups=[Looked("unknown", 0)],  # the aggregator restarted without u0
    )
    client, _, _ = make_client(make_settings, link, first=1, last=2, clock=clock)
    with caplog.at_level(logging.INFO, "fedsim.client"):
        summary = client.run_async()
    assert [m["update_id"] for _, m in link.pushed] == ["u0", "u0", "u1"]
    assert link.pushed[1][1] == link.pushed[0][1]  # the same metadata
    for name, tensor in link.pushed[0][0].items():
        np.testing.assert_array_equal(link.pushed[1][0][name], tensor)
    assert (summary.pushes_accepted, summary.repushed, summary.unconfirmed) == (2, 1, 0)
    assert "client-2 re-push slice 1 (lost in an aggregator restart) -> version 1" in caplog.text
    assert "re-pushed 1, 0 retries" in summary.line("client-2", 1.0)


def test_a_forgotten_update_is_dropped_not_pushed_again(make_settings):
    clock = FakeClock(start=0.0)
    link = FakeTransport(
        pulls=[ok_pull(0, 0), ok_pull(1, 0)],
        pushes=[accepted(1, seq=7), accepted(2, seq=8)],
        lookups=[Looked("unknown", 0, forgotten=True)],
    )
    client, _, _ = make_client(make_settings, link, first=1, last=2, clock=clock)
    summary = client.run_async()
    assert [m["update_id"] for _, m in link.pushed] == ["u0", "u1"]
    assert link.looked[0] == ("u0", 7)  # asked with its sequence number
    assert summary.repushed == 0 and client.unconfirmed == []


def test_an_unreachable_aggregator_keeps_them_and_the_client_goes_on(make_settings):
    class Unreachable(FakeTransport):
        def lookup(self, update_id, seq=None, *, attempts=None):
            self.looked.append((update_id, seq))
            return Looked("", 1, error="connection refused")

    clock = FakeClock(start=0.0)
    link = Unreachable(
        pulls=[ok_pull(0, 0), ok_pull(1, 0)], pushes=[accepted(1, seq=1), accepted(2, seq=2)]
    )
    client, learner, slept = make_client(
        make_settings, link, first=1, last=2, clock=clock, IDLE_SAVE_SECONDS=10
    )
    summary = client.run_async()
    assert learner.trained == [1, 2] and link.pull_calls == 2
    assert [item.meta["update_id"] for item in client.unconfirmed] == ["u0", "u1"]
    assert summary.unconfirmed == 2
    assert "2 not confirmed saved" in summary.line("client-2", 1.0)
    # One unanswered lookup is enough to stop asking about the rest that time.
    assert all(update_id == "u0" for update_id, _ in link.looked)
    assert 10 < sum(slept) <= 10 + SETTLE_SLACK + POLL_SECONDS


def test_the_end_of_run_wait_is_bounded(make_settings):
    clock = FakeClock(start=0.0)
    link = FakeTransport(
        pulls=[ok_pull(0, 0)],
        pushes=[accepted(1, seq=1)],
        lookups=[Looked("applied", 0, version=1, seq=1)] * 1000,  # never saved
    )
    client, _, slept = make_client(
        make_settings, link, first=1, last=1, clock=clock, IDLE_SAVE_SECONDS=3
    )
    summary = client.run_async()
    assert summary.unconfirmed == 1
    assert 3 < sum(slept) <= 3 + SETTLE_SLACK + POLL_SECONDS
    assert all(s == POLL_SECONDS for s in slept)


def test_the_end_of_run_wait_ends_once_saved(make_settings):
    clock = FakeClock(start=0.0)
    applied = Looked("applied", 0, version=1, seq=1)
    link = FakeTransport(
        pulls=[ok_pull(0, 0)], pushes=[accepted(1, seq=1)], lookups=[applied, applied, applied]
    )
    client, _, slept = make_client(make_settings, link, first=1, last=1, clock=clock)
    summary = client.run_async()
    assert summary.unconfirmed == 0 and client.unconfirmed == []
    assert len(link.looked) == 4 and len(slept) == 3  # asked at once, then every poll


# --- threads -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tf_threads", "slices", "cpus", "expected"),
    [
        ("0", "1-4 5-8 9-12", 2, 1),
        ("0", "1-6 7-12", 8, 4),
        ("0", "1-12", 2, 2),
        ("3", "1-4 5-8", 2, 3),
    ],
)
def test_threads_share_the_cores_among_clients(make_settings, tf_threads, slices, cpus, expected):
    settings = make_settings(TF_THREADS=tf_threads, CLIENT_SLICES=slices)
    assert threads_for(settings, cpu_count=cpus) == expected
