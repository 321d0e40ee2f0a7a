"""The aggregator's Prometheus metrics, served as text on `GET /metrics`.

`Recorder` is what the aggregator measures, one method per measurement; the
base records nothing and is the state's default, so the state calls its
metrics without checking that there are any. `Metrics` records them in a
`CollectorRegistry` of its own, so two apps in one process (tests) never share
or collide on a metric; a scrape only reads. `Guarded` wraps a recorder so that
a failing measurement is logged, never raised into the request that made it.

Names follow Prometheus' conventions (prometheus.io/docs/practices/naming):
the `fedsim_` prefix, base units in the name (`_seconds`, `_bytes`, `_ratio`
for a 0-1 fraction), `_total` on counters (added by the client library), and
labels only for small closed sets (refusal reason, task kind).
"""

from __future__ import annotations

import logging
import math
import re
import resource
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

log = logging.getLogger("fedsim.aggregator")

# Aggregating one mlp update takes about a millisecond, a cnn round of many
# clients up to seconds.
AGGREGATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# Staleness in versions: 0 under round rules, small under asynchronous ones
# unless a worker comes back after a long absence.
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 5, 8, 10, 15, 20, 30, 50, 100)
# Writing and fsyncing a checkpoint: a few ms for mlp on a local disk.
CHECKPOINT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# Label values come from the code (error codes, task kinds), never from a request:
# a closed vocabulary keeps the number of time series small.
_LABEL = re.compile(r"[a-z][a-z0-9_]{0,39}")


def _label(what: str, value: object) -> str:
    if not isinstance(value, str) or not _LABEL.fullmatch(value):
        raise ValueError(
            f"metrics: {what} must be a lower_case word of 1-40 characters, not {value!r}"
        )
    return value


def _count(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"metrics: {what} must be an integer >= 0, not {value!r}")
    return value


def _number(what: str, value: object, ok: Callable[[float], bool], must: str) -> float:
    """`value` as a float when it is a real number (not a bool) for which `ok` holds."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
        raise ValueError(f"metrics: {what} must be {must}, not {value!r}")
    return float(value)


def _seconds(what: str, value: object) -> float:
    return _number(what, value, lambda v: 0 <= v < math.inf, "a finite number of seconds >= 0")


def peak_resident_bytes() -> float:
    """This process's peak resident memory: /proc/self/status' VmHWM, else getrusage's
    ru_maxrss (KiB on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


class Recorder:
    """What the aggregator measures, one method each. This base records nothing."""

    # Uploads of trained weights.
    def update_accepted(self, staleness: int, seconds_aggregating: float | None = None) -> None:
        """An update was accepted. `seconds_aggregating`: None when it waits for its round."""

    def update_refused(self, reason: str) -> None:
        """An update was refused; `reason` is the answer's error code (`stale`, `too_large`...)."""

    def update_duplicate(self) -> None:
        """An update id came again and was acknowledged without aggregating it twice."""

    def aggregation_seconds(self, seconds: float) -> None:
        """Making a version took `seconds`: one update taken by an asynchronous rule, or a
        round closed (with secure aggregation's unmasking), up to its version published."""

    def bytes_received(self, n: int) -> None:
        """Bytes of an update's body, read."""

    def bytes_sent(self, n: int) -> None:
        """Bytes of model weights, sent."""

    # Tasks.
    def task_handed_out(self, kind: str) -> None:
        """A task of `kind` (train, evaluate) went to a worker."""

    def task_finished(self, kind: str) -> None:
        """A worker reported a task of `kind` done."""

    def task_expired(self, kind: str) -> None:
        """A lease on a task of `kind` ran out before its result came."""

    def workers_seen(self, n: int) -> None:
        """How many workers asked for or reported a task in the last minute."""

    # The run.
    def set_version(self, version: int) -> None:
        """The served global model is now `version`."""

    def set_round(self, number: int) -> None:
        """The current round is `number`."""

    def set_finished(self, finished: bool) -> None:
        """Whether the run has done all its work."""

    def evaluation(self, accuracy: float, loss: float, version: int | None = None) -> None:
        """The test-set scores of a version (the newest evaluated one)."""

    def dp_epsilon(self, epsilon: float) -> None:
        """Differential privacy's epsilon at DP_DELTA after the rounds closed (inf: no bound)."""

    # Checkpoints.
    def secagg_round(self, masked_in: int, recovered: int, nbytes: int, seconds: float) -> None:
        """A round closed by secure aggregation: clients in, dropouts recovered, its costs."""

    def checkpoint_written(self, seconds: float) -> None:
        """A checkpoint was written in `seconds`."""

    def checkpoint_failed(self) -> None:
        """A checkpoint could not be written."""


# Every measurement's name: the public methods of Recorder.
MEASUREMENTS = tuple(name for name in vars(Recorder) if not name.startswith("_"))


class Metrics(Recorder):
    """Every fedsim metric, in a registry of its own.

    `clock` gives wall-clock seconds since the epoch (time.time); tests pass a
    fake one. The start time is exported so that an alert on "no accepted
    update for 5 minutes" can also fire when none was ever accepted.
    """

    def __init__(self, clock: Callable[[], float] = time.time, process: bool = True) -> None:
        self._clock = clock
        self.registry = r = CollectorRegistry(auto_describe=True)
        if process:
            # process_resident_memory_bytes, process_cpu_seconds_total, ... (Linux only).
            ProcessCollector(registry=r)
            # The peak is read at each scrape from the kernel's own high-water mark, so no
            # sampling misses a short spike (a round's unmasking, a checkpoint's encoding).
            Gauge(
                "fedsim_process_peak_resident_memory_bytes",
                "Peak resident memory of the aggregator's process since it started (VmHWM).",
                registry=r,
            ).set_function(peak_resident_bytes)
        counter, gauge = partial(Counter, registry=r), partial(Gauge, registry=r)
        histogram = partial(Histogram, registry=r)

        # Uploads of trained weights.
        self._accepted = counter(
            "fedsim_updates_accepted", "Updates accepted (aggregated or held for the round)."
        )
        self._refused = counter(
            "fedsim_updates_refused",
            "Updates refused, by the error code of the answer.",
            ["reason"],
        )
        self._duplicates = counter(
            "fedsim_updates_duplicate",
            "Updates sent again with an id already received: acknowledged, aggregated once.",
        )
        self._staleness = histogram(
            "fedsim_update_staleness",
            "Versions between an accepted update's base version and the current one.",
            buckets=STALENESS_BUCKETS,
        )
        self._aggregation = histogram(
            "fedsim_aggregation_seconds",
            "Wall time to make a version: one update taken (asynchronous rules) or one round "
            "closed (the pipeline's stages, secure aggregation's unmasking, the rule, publishing).",
            buckets=AGGREGATION_BUCKETS,
        )
        self._last_accepted = gauge(
            "fedsim_last_accepted_update_timestamp_seconds",
            "Unix time of the last accepted update; 0 before the first.",
        )
        started = gauge("fedsim_start_time_seconds", "Unix time at which the aggregator started.")
        started.set(self._clock())

        # Tasks handed to workers.
        self._tasks_handed_out = counter(
            "fedsim_tasks_handed_out", "Tasks given to a worker, by kind.", ["kind"]
        )
        self._tasks_finished = counter(
            "fedsim_tasks_finished", "Tasks a worker reported done, by kind.", ["kind"]
        )
        self._tasks_expired = counter(
            "fedsim_tasks_expired",
            "Tasks whose lease ran out before a result came, by kind.",
            ["kind"],
        )
        self._workers = gauge("fedsim_workers", "Workers seen in the last minute.")

        # Traffic: request bodies in, model downloads out.
        self._received = counter("fedsim_received_bytes", "Bytes of update bodies received.")
        self._sent = counter("fedsim_sent_bytes", "Bytes of model weights sent.")

        # The run.
        self._version = gauge("fedsim_model_version", "Version of the served global model.")
        self._round = gauge(
            "fedsim_round", "Current round number (round rules; 0 for asynchronous ones)."
        )
        self._finished = gauge(
            "fedsim_run_finished", "1 once the run has done all its rounds, else 0."
        )
        self._accuracy = gauge(
            "fedsim_test_accuracy_ratio", "Test-set accuracy (0-1) of the last evaluated version."
        )
        self._loss = gauge("fedsim_test_loss", "Test-set loss of the last evaluated version.")
        self._evaluated = gauge(
            "fedsim_evaluated_version", "Version whose test scores are exported."
        )
        self._epsilon = gauge(
            "fedsim_dp_epsilon",
            "Differential privacy's epsilon at DP_DELTA after the rounds closed; +Inf: no bound.",
        )

        # Secure aggregation (SECAGG=true): per round closed, never a value of one update.
        self._secagg_masked = counter(
            "fedsim_secagg_clients_masked", "Clients whose masked input a secure round summed."
        )
        self._secagg_recovered = counter(
            "fedsim_secagg_dropouts_recovered",
            "Clients that dropped after sharing their keys, their masks removed from the sum.",
        )
        self._secagg_bytes = counter(
            "fedsim_secagg_protocol_bytes", "Bytes of secure aggregation messages received."
        )
        self._secagg_seconds = histogram(
            "fedsim_secagg_protocol_seconds",
            "Time from a secure round's first attempt to its unmasked sum.",
            buckets=(1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
        )

        # Checkpoints.
        self._checkpoint = histogram(
            "fedsim_checkpoint_seconds",
            "Time to write one checkpoint (encode, fsync, rename).",
            buckets=CHECKPOINT_BUCKETS,
        )
        self._checkpoint_failures = counter(
            "fedsim_checkpoint_failures", "Checkpoint writes that failed."
        )
        self._last_checkpoint = gauge(
            "fedsim_last_checkpoint_timestamp_seconds",
            "Unix time of the last checkpoint written; 0 before the first.",
        )

    # Uploads ---------------------------------------------------------------

    def update_accepted(self, staleness: int, seconds_aggregating: float | None = None) -> None:
        staleness = _count("staleness", staleness)  # check both before moving anything
        if seconds_aggregating is not None:
            self._aggregation.observe(_seconds("aggregation time", seconds_aggregating))
        self._staleness.observe(staleness)
        self._accepted.inc()
        self._last_accepted.set(self._clock())

    def update_refused(self, reason: str) -> None:
        self._refused.labels(reason=_label("reason", reason)).inc()

    def update_duplicate(self) -> None:
        self._duplicates.inc()

    def aggregation_seconds(self, seconds: float) -> None:
        self._aggregation.observe(_seconds("aggregation time", seconds))

    def bytes_received(self, n: int) -> None:
        self._received.inc(_count("bytes received", n))

    def bytes_sent(self, n: int) -> None:
        self._sent.inc(_count("bytes sent", n))

    # Tasks -----------------------------------------------------------------

    def task_handed_out(self, kind: str) -> None:
        self._tasks_handed_out.labels(kind=_label("task kind", kind)).inc()

    def task_finished(self, kind: str) -> None:
        self._tasks_finished.labels(kind=_label("task kind", kind)).inc()

    def task_expired(self, kind: str) -> None:
        self._tasks_expired.labels(kind=_label("task kind", kind)).inc()

    def workers_seen(self, n: int) -> None:
        self._workers.set(_count("workers", n))

    # The run ---------------------------------------------------------------

    def set_version(self, version: int) -> None:
        self._version.set(_count("version", version))

    def set_round(self, number: int) -> None:
        self._round.set(_count("round", number))

    def set_finished(self, finished: bool) -> None:
        if not isinstance(finished, bool):
            raise ValueError(f"metrics: finished must be True or False, not {finished!r}")
        self._finished.set(int(finished))

    def evaluation(self, accuracy: float, loss: float, version: int | None = None) -> None:
        accuracy = _number("accuracy", accuracy, lambda v: 0 <= v <= 1, "a number in [0, 1]")
        loss = _number("loss", loss, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
        self._accuracy.set(accuracy)
        self._loss.set(loss)
        if version is not None:
            self._evaluated.set(_count("evaluated version", version))

    def dp_epsilon(self, epsilon: float) -> None:
        self._epsilon.set(_number("epsilon", epsilon, lambda v: v >= 0, "a number >= 0 or inf"))

    # Checkpoints -----------------------------------------------------------

    def secagg_round(self, masked_in: int, recovered: int, nbytes: int, seconds: float) -> None:
        self._secagg_masked.inc(_count("masked_in", masked_in))
        self._secagg_recovered.inc(_count("recovered", recovered))
        self._secagg_bytes.inc(_count("bytes", nbytes))
        self._secagg_seconds.observe(_seconds("seconds", seconds))

    def checkpoint_written(self, seconds: float) -> None:
        self._checkpoint.observe(_seconds("checkpoint time", seconds))
        self._last_checkpoint.set(self._clock())

    def checkpoint_failed(self) -> None:
        self._checkpoint_failures.inc()

    # Exposition ------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The text exposition format: (body, Content-Type header value)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Guarded(Recorder):
    """`inner`'s measurements, a failure logged instead of raised.

    The state measures under its lock, in the middle of an update: a metric
    that raised there would leave the update half done. Metrics never break
    the service.
    """

    def __init__(self, inner: Recorder) -> None:
        self.inner = inner


def _guarded(name: str) -> Callable[..., None]:
    def call(self: Guarded, *args: Any, **kwargs: Any) -> None:
        try:
            getattr(self.inner, name)(*args, **kwargs)
        except Exception:
            log.exception("metrics: %s failed", name)

    call.__name__, call.__qualname__ = name, f"Guarded.{name}"
    call.__doc__ = getattr(Recorder, name).__doc__
    return call


for _name in MEASUREMENTS:
    setattr(Guarded, _name, _guarded(_name))
