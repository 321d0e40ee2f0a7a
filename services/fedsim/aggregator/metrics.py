"""The aggregator's Prometheus metrics, served as text on `GET /metrics`.

One `Metrics` object per app holds its own `CollectorRegistry`, so two apps in
one process (tests) never share or collide on a metric. The state calls the
small methods below where things happen; a scrape only reads.

Names follow Prometheus' conventions (prometheus.io/docs/practices/naming):
the `fedsim_` prefix, base units in the name (`_seconds`, `_bytes`, `_ratio`
for a 0-1 fraction), `_total` on counters (added by the client library), and
labels only for small closed sets (refusal reason, task kind).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
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


def _seconds(what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise ValueError(f"metrics: {what} must be a finite number of seconds >= 0, not {value!r}")
    return float(value)


class Metrics:
    """Every fedsim metric, in a registry of its own.

    `clock` gives wall-clock seconds since the epoch (time.time); tests pass a
    fake one. The start time is exported so that an alert on "no accepted
    update for 5 minutes" can also fire when none was ever accepted.
    """

    def __init__(self, clock: Callable[[], float] = time.time, process: bool = True) -> None:
        self._clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        if process:
            # process_resident_memory_bytes, process_cpu_seconds_total, ... (Linux only).
            ProcessCollector(registry=self.registry)
        r = self.registry

        # Uploads of trained weights.
        self._accepted = Counter(
            "fedsim_updates_accepted",
            "Updates accepted (aggregated or held for the round).",
            registry=r,
        )
        self._refused = Counter(
            "fedsim_updates_refused",
            "Updates refused, by the error code of the answer.",
            ["reason"],
            registry=r,
        )
        self._duplicates = Counter(
            "fedsim_updates_duplicate",
            "Updates sent again with an id already received: acknowledged, aggregated once.",
            registry=r,
        )
        self._staleness = Histogram(
            "fedsim_update_staleness",
            "Versions between an accepted update's base version and the current one.",
            buckets=STALENESS_BUCKETS,
            registry=r,
        )
        self._aggregation = Histogram(
            "fedsim_aggregation_seconds",
            "Time to aggregate: one update (asynchronous rules) or one round.",
            buckets=AGGREGATION_BUCKETS,
            registry=r,
        )
        self._last_accepted = Gauge(
            "fedsim_last_accepted_update_timestamp_seconds",
            "Unix time of the last accepted update; 0 before the first.",
            registry=r,
        )
        self._started = Gauge(
            "fedsim_start_time_seconds", "Unix time at which the aggregator started.", registry=r
        )
        self._started.set(self._clock())

        # Tasks handed to workers.
        self._tasks_handed_out = Counter(
            "fedsim_tasks_handed_out", "Tasks given to a worker, by kind.", ["kind"], registry=r
        )
        self._tasks_finished = Counter(
            "fedsim_tasks_finished", "Tasks a worker reported done, by kind.", ["kind"], registry=r
        )
        self._tasks_expired = Counter(
            "fedsim_tasks_expired",
            "Tasks whose lease ran out before a result came, by kind.",
            ["kind"],
            registry=r,
        )
        self._workers = Gauge("fedsim_workers", "Workers seen in the last minute.", registry=r)

        # Traffic: request bodies in, model downloads out.
        self._received = Counter(
            "fedsim_received_bytes", "Bytes of update bodies received.", registry=r
        )
        self._sent = Counter("fedsim_sent_bytes", "Bytes of model weights sent.", registry=r)

        # The run.
        self._version = Gauge(
            "fedsim_model_version", "Version of the served global model.", registry=r
        )
        self._round = Gauge(
            "fedsim_round",
            "Current round number (round rules; 0 for asynchronous ones).",
            registry=r,
        )
        self._finished = Gauge(
            "fedsim_run_finished", "1 once the run has done all its rounds, else 0.", registry=r
        )
        self._accuracy = Gauge(
            "fedsim_test_accuracy_ratio",
            "Test-set accuracy (0-1) of the last evaluated version.",
            registry=r,
        )
        self._loss = Gauge(
            "fedsim_test_loss", "Test-set loss of the last evaluated version.", registry=r
        )
        self._evaluated = Gauge(
            "fedsim_evaluated_version", "Version whose test scores are exported.", registry=r
        )

        # Checkpoints.
        self._checkpoint = Histogram(
            "fedsim_checkpoint_seconds",
            "Time to write one checkpoint (encode, fsync, rename).",
            buckets=CHECKPOINT_BUCKETS,
            registry=r,
        )
        self._checkpoint_failures = Counter(
            "fedsim_checkpoint_failures", "Checkpoint writes that failed.", registry=r
        )
        self._last_checkpoint = Gauge(
            "fedsim_last_checkpoint_timestamp_seconds",
            "Unix time of the last checkpoint written; 0 before the first.",
            registry=r,
        )

    # Uploads ---------------------------------------------------------------

    def update_accepted(self, staleness: int, seconds_aggregating: float | None = None) -> None:
        """An update was accepted. `seconds_aggregating`: None when it waits for its round."""
        staleness = _count("staleness", staleness)  # check both before moving anything
        if seconds_aggregating is not None:
            self._aggregation.observe(_seconds("aggregation time", seconds_aggregating))
        self._staleness.observe(staleness)
        self._accepted.inc()
        self._last_accepted.set(self._clock())

    def update_refused(self, reason: str) -> None:
        """An update was refused; `reason` is the answer's error code (`stale`, `too_large`...)."""
        self._refused.labels(reason=_label("reason", reason)).inc()

    def update_duplicate(self) -> None:
        """An update id came again and was acknowledged without aggregating it twice."""
        self._duplicates.inc()

    def aggregation_seconds(self, seconds: float) -> None:
        """One aggregation step took `seconds` (e.g. closing a round)."""
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
        """How many workers asked for or reported a task in the last minute."""
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
        """The test-set scores of a version (the newest evaluated one)."""
        if (
            isinstance(accuracy, bool)
            or not isinstance(accuracy, int | float)
            or not 0 <= accuracy <= 1
        ):
            raise ValueError(f"metrics: accuracy must be a number in [0, 1], not {accuracy!r}")
        if (
            isinstance(loss, bool)
            or not isinstance(loss, int | float)
            or not (math.isfinite(loss) and loss >= 0)
        ):
            raise ValueError(f"metrics: loss must be a finite number >= 0, not {loss!r}")
        self._accuracy.set(accuracy)
        self._loss.set(loss)
        if version is not None:
            self._evaluated.set(_count("evaluated version", version))

    # Checkpoints -----------------------------------------------------------

    def checkpoint_written(self, seconds: float) -> None:
        self._checkpoint.observe(_seconds("checkpoint time", seconds))
        self._last_checkpoint.set(self._clock())

    def checkpoint_failed(self) -> None:
        self._checkpoint_failures.inc()

    # One entry point for the state ------------------------------------------

    def hook(self, what: str, values: Mapping[str, Any]) -> None:
        """`state.metrics_hook = metrics.hook`: one measurement by name, e.g.
        `hook("refused", {"reason": "stale"})`. The names are those of `HOOKS`."""
        try:
            method, keys = HOOKS[what]
        except KeyError:
            raise ValueError(
                f"metrics: unknown measurement {what!r}; known: {', '.join(sorted(HOOKS))}"
            ) from None
        unknown = set(values) - set(keys)
        if unknown:
            raise ValueError(
                f"metrics: {what} takes {', '.join(keys) or 'no values'}, not {', '.join(sorted(unknown))}"
            )
        getattr(self, method)(**values)

    # Exposition ------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The text exposition format: (body, Content-Type header value)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# hook() names: measurement -> (method, the values it takes).
HOOKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "accepted": ("update_accepted", ("staleness", "seconds_aggregating")),
    "refused": ("update_refused", ("reason",)),
    "duplicate": ("update_duplicate", ()),
    "aggregation": ("aggregation_seconds", ("seconds",)),
    "received": ("bytes_received", ("n",)),
    "sent": ("bytes_sent", ("n",)),
    "task": ("task_handed_out", ("kind",)),
    "task_finished": ("task_finished", ("kind",)),
    "task_expired": ("task_expired", ("kind",)),
    "workers": ("workers_seen", ("n",)),
    "version": ("set_version", ("version",)),
    "round": ("set_round", ("number",)),
    "finished": ("set_finished", ("finished",)),
    "evaluation": ("evaluation", ("accuracy", "loss", "version")),
    "checkpoint": ("checkpoint_written", ("seconds",)),
    "checkpoint_failed": ("checkpoint_failed", ()),
}
