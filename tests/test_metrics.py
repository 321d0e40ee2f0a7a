"""fedsim.aggregator.metrics: what `render()` exposes, read back with prometheus_client's parser."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedsim.aggregator.metrics import MEASUREMENTS, STALENESS_BUCKETS, Guarded, Metrics, Recorder


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, keyed by (name, sorted labels)."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def metrics(clock: Clock) -> Metrics:
    return Metrics(clock=clock)


def test_fresh_metrics_start_at_zero_and_export_the_start_time(metrics, clock):
    for name in (
        "fedsim_updates_accepted_total",
        "fedsim_updates_duplicate_total",
        "fedsim_received_bytes_total",
        "fedsim_sent_bytes_total",
        "fedsim_checkpoint_failures_total",
        "fedsim_model_version",
        "fedsim_round",
        "fedsim_run_finished",
        "fedsim_workers",
        "fedsim_last_accepted_update_timestamp_seconds",
    ):
        assert value(metrics, name) == 0, name
    assert value(metrics, "fedsim_start_time_seconds") == clock.now
    # No refusal yet: no series at all, so a rate over refusals is empty, not 0/0.
    assert not [k for k in samples(metrics) if k[0] == "fedsim_updates_refused_total"]


def test_accepted_updates_count_staleness_aggregation_time_and_timestamp(metrics, clock):
    metrics.update_accepted(staleness=0, seconds_aggregating=0.002)
    clock.now += 30
    metrics.update_accepted(staleness=3, seconds_aggregating=None)  # held for its round
    metrics.update_accepted(staleness=7, seconds_aggregating=0.2)

    assert value(metrics, "fedsim_updates_accepted_total") == 3
    assert value(metrics, "fedsim_last_accepted_update_timestamp_seconds") == clock.now
    assert value(metrics, "fedsim_update_staleness_count") == 3
    assert value(metrics, "fedsim_update_staleness_sum") == 10
    assert value(metrics, "fedsim_update_staleness_bucket", le="0.0") == 1
    assert value(metrics, "fedsim_update_staleness_bucket", le="3.0") == 2
    assert value(metrics, "fedsim_update_staleness_bucket", le="5.0") == 2
    assert value(metrics, "fedsim_update_staleness_bucket", le="8.0") == 3
    assert value(metrics, "fedsim_update_staleness_bucket", le="+Inf") == 3
    assert len([k for k in samples(metrics) if k[0] == "fedsim_update_staleness_bucket"]) == (
        len(STALENESS_BUCKETS) + 1
    )
    # Only the two updates that were aggregated on arrival were timed.
    assert value(metrics, "fedsim_aggregation_seconds_count") == 2
    assert value(metrics, "fedsim_aggregation_seconds_sum") == pytest.approx(0.202)
    metrics.aggregation_seconds(1.5)  # a round closed
    assert value(metrics, "fedsim_aggregation_seconds_count") == 3
    assert value(metrics, "fedsim_aggregation_seconds_bucket", le="1.0") == 2


def test_refusals_are_counted_per_reason_and_not_as_accepted(metrics):
    metrics.update_refused("stale")
    metrics.update_refused("stale")
    metrics.update_refused("too_large")
    metrics.update_duplicate()

    assert value(metrics, "fedsim_updates_refused_total", reason="stale") == 2
    assert value(metrics, "fedsim_updates_refused_total", reason="too_large") == 1
    assert value(metrics, "fedsim_updates_refused_total", reason="invalid_weights") is None
    assert value(metrics, "fedsim_updates_duplicate_total") == 1
    assert value(metrics, "fedsim_updates_accepted_total") == 0
    assert value(metrics, "fedsim_last_accepted_update_timestamp_seconds") == 0


def test_tasks_by_kind_and_outcome(metrics):
    for _ in range(3):
        metrics.task_handed_out("train")
    metrics.task_handed_out("evaluate")
    metrics.task_finished("train")
    metrics.task_finished("evaluate")
    metrics.task_expired("train")
    metrics.workers_seen(2)

    assert value(metrics, "fedsim_tasks_handed_out_total", kind="train") == 3
    assert value(metrics, "fedsim_tasks_handed_out_total", kind="evaluate") == 1
    assert value(metrics, "fedsim_tasks_finished_total", kind="train") == 1
    assert value(metrics, "fedsim_tasks_finished_total", kind="evaluate") == 1
    assert value(metrics, "fedsim_tasks_expired_total", kind="train") == 1
    assert value(metrics, "fedsim_tasks_expired_total", kind="evaluate") is None
    assert value(metrics, "fedsim_workers") == 2
    metrics.workers_seen(0)
    assert value(metrics, "fedsim_workers") == 0


def test_bytes_version_round_finished_and_evaluation(metrics):
    metrics.bytes_received(797_520)
    metrics.bytes_received(797_520)
    metrics.bytes_sent(797_000)
    metrics.set_version(12)
    metrics.set_round(3)
    metrics.evaluation(accuracy=0.9731, loss=0.088, version=12)

    assert value(metrics, "fedsim_received_bytes_total") == 2 * 797_520
    assert value(metrics, "fedsim_sent_bytes_total") == 797_000
    assert value(metrics, "fedsim_model_version") == 12
    assert value(metrics, "fedsim_round") == 3
    assert value(metrics, "fedsim_test_accuracy_ratio") == pytest.approx(0.9731)
    assert value(metrics, "fedsim_test_loss") == pytest.approx(0.088)
    assert value(metrics, "fedsim_evaluated_version") == 12
    metrics.set_finished(True)
    assert value(metrics, "fedsim_run_finished") == 1
    metrics.set_finished(False)  # a resumed run with more rounds
    assert value(metrics, "fedsim_run_finished") == 0


def test_checkpoints_time_and_failures(metrics, clock):
    metrics.checkpoint_written(0.012)
    clock.now += 5
    metrics.checkpoint_written(0.3)
    metrics.checkpoint_failed()

    assert value(metrics, "fedsim_checkpoint_seconds_count") == 2
    assert value(metrics, "fedsim_checkpoint_seconds_sum") == pytest.approx(0.312)
    assert value(metrics, "fedsim_checkpoint_seconds_bucket", le="0.025") == 1
    assert value(metrics, "fedsim_checkpoint_failures_total") == 1
    assert value(metrics, "fedsim_last_checkpoint_timestamp_seconds") == clock.now


def test_two_instances_do_not_share_values(clock):
    a, b = Metrics(clock=clock), Metrics(clock=clock)
    a.update_accepted(staleness=1)
    a.update_refused("stale")
    assert value(a, "fedsim_updates_accepted_total") == 1
    assert value(b, "fedsim_updates_accepted_total") == 0
    assert value(b, "fedsim_updates_refused_total", reason="stale") is None


def test_process_metrics_are_included_by_default_and_can_be_left_out(clock):
    # /proc is read on Linux only; elsewhere the collector exports nothing.
    with_process = {k[0] for k in samples(Metrics(clock=clock))}
    without = {k[0] for k in samples(Metrics(clock=clock, process=False))}
    assert not any(n.startswith("process_") for n in without)
    assert with_process >= without


def test_the_peak_resident_memory_is_the_processs_high_water_mark(clock):
    metrics = Metrics(clock=clock)
    grown = bytearray(64 * 2**20)
    grown[::4096] = b"x" * len(grown[::4096])  # a byte per page: 64 MiB resident
    holding = value(metrics, "process_resident_memory_bytes")
    del grown  # given back: the resident figure falls, the peak stays

    peak = value(metrics, "fedsim_process_peak_resident_memory_bytes")

    assert peak >= holding > 0
    assert value(metrics, "process_resident_memory_bytes") < peak
    left_out = Metrics(clock=clock, process=False)
    assert value(left_out, "fedsim_process_peak_resident_memory_bytes") is None


def test_every_name_follows_the_conventions(metrics):
    metrics.update_refused("stale")
    metrics.task_handed_out("train")
    metrics.task_finished("train")
    metrics.task_expired("train")
    body, _ = metrics.render()
    for family in text_string_to_metric_families(body.decode()):
        if family.name.startswith("process_"):
            continue
        assert family.name.startswith("fedsim_"), family.name
        assert family.documentation, family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        if family.type == "histogram":
            assert family.name.endswith(("_seconds", "_staleness")), family.name


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.update_refused("Stale Version"), "reason must be a lower_case word"),
        (lambda m: m.update_refused(""), "reason must be a lower_case word"),
        (lambda m: m.task_handed_out("x" * 41), "task kind must be a lower_case word"),
        (lambda m: m.update_accepted(staleness=-1), "staleness must be an integer >= 0"),
        (lambda m: m.update_accepted(staleness=1.5), "staleness must be an integer >= 0"),
        (lambda m: m.update_accepted(0, float("nan")), "aggregation time must be a finite number"),
        (lambda m: m.bytes_received(-5), "bytes received must be an integer >= 0"),
        (lambda m: m.bytes_sent(True), "bytes sent must be an integer >= 0"),
        (lambda m: m.set_version(-1), "version must be an integer >= 0"),
        (lambda m: m.set_finished(1), "finished must be True or False"),
        (lambda m: m.evaluation(1.2, 0.1), r"accuracy must be a number in \[0, 1\]"),
        (lambda m: m.evaluation(0.9, float("inf")), "loss must be a finite number >= 0"),
        (lambda m: m.evaluation(0.9, -1), "loss must be a finite number >= 0"),
        (lambda m: m.evaluation(float("nan"), 0.1), "accuracy must be a number"),
        (lambda m: m.checkpoint_written(-0.1), "checkpoint time must be a finite number"),
        (lambda m: m.workers_seen(None), "workers must be an integer >= 0"),
    ],
)
def test_bad_values_are_refused_with_a_precise_message(metrics, call, message):
    before = fedsim_lines(metrics)
    with pytest.raises(ValueError, match=message):
        call(metrics)
    assert fedsim_lines(metrics) == before  # nothing moved


def fedsim_lines(metrics: Metrics) -> list[str]:
    """The exposition without the process metrics, which change by themselves."""
    return [line for line in metrics.render()[0].decode().splitlines() if "process_" not in line]


def test_every_measurement_is_a_method_of_the_same_signature_in_metrics():
    import inspect

    assert set(MEASUREMENTS) >= {"update_accepted", "checkpoint_failed", "evaluation"}
    for name in MEASUREMENTS:
        assert name in vars(Metrics), f"Metrics does not record {name}"
        base = inspect.signature(getattr(Recorder, name))
        assert inspect.signature(getattr(Metrics, name)) == base, name


def test_the_default_recorder_records_nothing_and_takes_every_call():
    recorder = Recorder()
    recorder.update_accepted(staleness=2, seconds_aggregating=0.01)
    recorder.update_refused("stale")
    recorder.evaluation(accuracy=0.9, loss=0.3, version=4)
    recorder.checkpoint_failed()  # nothing to assert but that it does not raise


def test_guarded_passes_measurements_through(metrics, clock):
    guarded = Guarded(metrics)

    guarded.update_accepted(staleness=2)
    guarded.update_refused("stale")
    guarded.task_handed_out("train")
    guarded.evaluation(accuracy=0.9, loss=0.3)
    guarded.set_version(4)
    guarded.bytes_received(100)

    assert value(metrics, "fedsim_updates_accepted_total") == 1
    assert value(metrics, "fedsim_update_staleness_sum") == 2
    assert value(metrics, "fedsim_updates_refused_total", reason="stale") == 1
    assert value(metrics, "fedsim_tasks_handed_out_total", kind="train") == 1
    assert value(metrics, "fedsim_test_accuracy_ratio") == pytest.approx(0.9)
    assert value(metrics, "fedsim_model_version") == 4
    assert value(metrics, "fedsim_received_bytes_total") == 100
    assert Guarded.update_accepted.__doc__ == Recorder.update_accepted.__doc__


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda g: g.update_refused("Stale Version"), "update_refused failed"),
        (lambda g: g.update_accepted(staleness=-1), "update_accepted failed"),
        (lambda g: g.update_refused(), "update_refused failed"),  # a missing argument
    ],
)
def test_guarded_logs_a_failing_measurement_instead_of_raising(metrics, caplog, call, message):
    before = fedsim_lines(metrics)

    call(Guarded(metrics))  # does not raise

    assert fedsim_lines(metrics) == before
    assert message in caplog.text
