"""A worker acting out its task's client: the real clock's wait and the dropout decision."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fedsim.client import pacing
from fedsim.data.population import drop_draw
from fedsim.protocol import Dropout, Profile, TrainSettings, TrainTask

TRAIN = TrainSettings(epochs=1, batch_size=10, learning_rate=0.1, optimizer="sgd")


def task(profile: Profile | None, seed: int = 5, attempt: int | None = None) -> TrainTask:
    return TrainTask(
        id="r1.c2",
        lease="ab" * 32,
        client="client-2",
        samples=10,
        sha256="0" * 64,
        base_version=0,
        seed=seed,
        train=TRAIN,
        partition={},
        profile=profile,
        attempt=attempt,
    )


class Recorder:
    def __init__(self, status: int | None = 200) -> None:
        self.sent: list[Dropout] = []
        self.status = status

    def give_back(self, dropped: Dropout) -> tuple[int | None, dict, int]:
        self.sent.append(dropped)
        return self.status, {"detail": "task r1.c2 is not held"}, 1


def test_no_profile_or_the_virtual_clock_waits_nothing() -> None:
    assert pacing.wait_after(None, 5.0, 10**6, 10**6).seconds == 0
    virtual = Profile(speed=10, bandwidth=1.0, clock="virtual")
    assert pacing.wait_after(virtual, 5.0, 10**6, 10**6).seconds == 0


def test_the_wait_is_the_extra_compute_and_the_transfer_over_the_time_scale() -> None:
    profile = Profile(speed=3, bandwidth=1000.0, time_scale=2)
    wait = pacing.wait_after(profile, 2.0, 3000, 1000)
    # compute (3 - 1) x 2 s = 4 s, network (3000 + 1000) / 1000 = 4 s, over TIME_SCALE 2
    assert (wait.compute, wait.network, wait.seconds) == (4.0, 4.0, 4.0)
    assert wait.note() == (
        " (as a x3.00 client: waited 4.0s = compute 4.0s + network 4.0s at TIME_SCALE 2)"
    )


def test_a_client_faster_than_its_worker_adds_no_compute_wait() -> None:
    wait = pacing.wait_after(Profile(speed=0.5), 2.0, 3000, 1000)  # unlimited bandwidth
    assert wait.seconds == 0 and wait.note() == ""


def test_nbytes_counts_every_weight() -> None:
    model = {"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float32)}
    assert pacing.nbytes(model) == 68


def test_a_task_drops_by_its_seed_and_attempt() -> None:
    profile = Profile(dropout=0.5)
    seeds = range(200)
    assert [pacing.drops(task(profile, s)) for s in seeds] == [drop_draw(s, 0) < 0.5 for s in seeds]
    assert [pacing.drops(task(profile, s, 3)) for s in seeds] == [
        drop_draw(s, 3) < 0.5 for s in seeds
    ]
    assert not any(pacing.drops(task(Profile(), s)) for s in seeds)  # dropout 0
    assert not pacing.drops(task(None))


def test_abort_gives_the_task_back_with_its_lease(caplog) -> None:
    sent = Recorder()
    profile = Profile(dropout=0.3, dropout_mode="abort")
    with caplog.at_level(logging.INFO):
        retries = pacing.drop("w1", "client-2 round 1", task(profile, attempt=2), sent, "host-1-ab")
    assert retries == 1
    assert sent.sent == [Dropout("host-1-ab", "r1.c2", "ab" * 32)]
    assert "w1 client-2 round 1 dropout (p 0.30, attempt 2): giving the task back" in caplog.text


def test_a_give_back_refused_says_the_lease_runs_out_instead(caplog) -> None:
    with caplog.at_level(logging.INFO):
        pacing.drop("w1", "client-2", task(Profile(dropout=0.3)), Recorder(409), "h-1-ab")
    assert "dropout not taken back (task r1.c2 is not held): its lease runs out" in caplog.text


def test_silent_says_nothing_to_the_aggregator(caplog) -> None:
    sent = Recorder()
    with caplog.at_level(logging.INFO):
        retries = pacing.drop(
            "w1", "client-2", task(Profile(dropout=0.3, dropout_mode="silent")), sent, "h-1-ab"
        )
    assert retries == 0 and sent.sent == []
    assert "silent until its lease runs out" in caplog.text


@pytest.mark.parametrize(
    ("field", "value"),
    [("speed", 0), ("speed", True), ("bandwidth", -1), ("dropout", 1), ("time_scale", "2"),
     ("dropout_mode", "later"), ("clock", "wall")],
)  # fmt: skip
def test_a_bad_profile_in_a_task_is_refused(field: str, value: object) -> None:
    from fedsim.protocol import Invalid

    data = task(Profile(speed=2, bandwidth=10.0, dropout=0.1)).to_json()
    data["profile"][field] = value
    with pytest.raises(Invalid, match="profile"):
        TrainTask.from_json(data)


def test_a_profile_and_attempt_travel_and_are_absent_by_default() -> None:
    plain = task(None).to_json()
    assert "profile" not in plain and "attempt" not in plain
    sent = task(Profile(speed=2.5, bandwidth=None, dropout=0.1), attempt=1)
    assert TrainTask.from_json(sent.to_json()) == sent


def test_non_finite_names_the_first_tensor_with_a_nan_or_an_infinity() -> None:
    ok = {"a": np.ones(3, np.float32), "b": np.zeros(2, np.float32)}
    assert pacing.non_finite(ok) is None
    assert pacing.non_finite({**ok, "b": np.array([0.0, np.inf], np.float32)}) == "b"
    assert pacing.non_finite({"c": np.array([np.nan], np.float32), **ok}) == "c"


def test_a_diverged_training_is_reported_with_what_was_non_finite(caplog) -> None:
    sent = Recorder()
    with caplog.at_level(logging.INFO):
        retries = pacing.diverged(
            "w1",
            "client-2 round 1",
            task(None),
            sent,
            "h-1-ab",
            "hidden/kernel from version 4",
            1.3e7,
        )
    detail = "non-finite weights in hidden/kernel from version 4, loss 1.3e+07"
    assert retries == 1 and sent.sent == [Dropout("h-1-ab", "r1.c2", "ab" * 32, detail)]
    assert f"w1 client-2 round 1 diverged: {detail}; reported, the run stops" in caplog.text
    pacing.diverged("w1", "c", task(None), Recorder(409), "h-1-ab", "x", float("nan"))
    assert "loss not finite" in caplog.text and "did not take the report" in caplog.text


@pytest.mark.parametrize("diverged", [7, "", "two\nlines", "x" * (Dropout.MAX_DETAIL + 1)], ids=str)
def test_a_dropout_s_diverged_detail_is_one_short_line(diverged) -> None:
    from fedsim.protocol import Invalid

    body = {**Dropout("h-1-ab", "r1.c2", "ab" * 32).to_json(), "diverged": diverged}
    with pytest.raises(Invalid, match="diverged must be one line of 1-300 printable"):
        Dropout.from_json(body)
    assert "diverged" not in Dropout("h-1-ab", "r1.c2", "ab" * 32).to_json()  # older form
    both = Dropout("h-1-ab", "r1.c2", "ab" * 32, "nan in a")
    assert Dropout.from_json(both.to_json()) == both
