"""A worker: ask the aggregator for a task, do it, report, until the run is finished.

A task is either "train logical client c (its samples, from base version v, with
these settings)" or "score version v on the test set". The worker downloads the
model only when its copy is stale (ETag), trains on the client's samples,
checked against the partition plan's SHA-256, and pushes the weights with the
task's id, so a retried push counts once. Accepted updates stay in the outbox
until they are in a checkpoint. With nothing to do yet it waits as the
aggregator suggests; when the run is finished, or all the work is held by other
workers, it exits with its summary.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable

import numpy as np

from fedsim import allocator, models, pipeline, weights
from fedsim.client import pacing
from fedsim.client.outbox import Outbox, describe
from fedsim.client.records import Learner, LocalModel, Summary
from fedsim.client.secagg import SecaggWorker
from fedsim.client.transport import ProtocolError, Transport
from fedsim.config import Settings
from fedsim.data import partition
from fedsim.protocol import (
    EvalTask,
    Evaluation,
    SecaggTask,
    Task,
    TrainTask,
    UpdateMeta,
)

log = logging.getLogger("fedsim.client")

STARTUP_SECONDS = 120.0  # how long a worker waits for the aggregator to come up
LOST_SECONDS = 120.0  # how long it goes on asking when the aggregator stops answering
IDLE_WAIT_MAX = 2.0  # longest pause between two requests for work


class AggregatorUnreachable(RuntimeError):
    """The aggregator did not answer for longer than the worker waits."""


def new_worker_id() -> str:
    """Unique per process, readable in the aggregator's records: host, pid, random."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(2)}"


class Worker:
    def __init__(
        self,
        settings: Settings,
        transport: Transport,
        make_learner: Callable[[int], Learner],
        *,
        warm_up: Callable[[], None] = lambda: None,
        uid: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.transport = transport
        self.make_learner = make_learner  # called once with the number of live workers
        self.warm_up = warm_up  # imports TensorFlow, whose thread pools are sized after
        self.uid = uid or new_worker_id()
        self.clock, self.sleep = clock, sleep
        self.summary = Summary()
        self.name = "worker"
        self.learner: Learner | None = None
        self.model = LocalModel()
        self.outbox = Outbox(
            self.name,
            transport,
            self.summary.counts,
            clock=clock,
            sleep=sleep,
            idle_save_seconds=settings.idle_save_seconds,
        )
        self._plans: dict[str, tuple[partition.Part, ...]] = {}
        self._seen_clients: set[str] = set()
        self._announced = False
        self.stages = pipeline.build(settings)  # an update's path from training to push
        self.secagg = SecaggWorker(settings.secagg_key_file, transport)

    # --- start --------------------------------------------------------------------

    def start(self) -> None:
        """Wait for the aggregator, introduce this worker, then load TensorFlow and the data."""
        deadline = self.clock() + STARTUP_SECONDS
        while (hello := self.transport.hello(self.uid)) is None:
            if self.clock() >= deadline:
                raise AggregatorUnreachable(
                    f"no answer from the aggregator at {self.transport.base_url} "
                    f"for {STARTUP_SECONDS:.0f}s: is it running, and is AGGREGATOR_URL right?"
                )
            self.sleep(1.0)
        self._rename(str(hello.get("worker") or self.name))
        # Import TensorFlow (seconds), then count again: the workers started with this
        # one have said hello by then, so the count sizes the thread pools fairly.
        self.warm_up()
        again = self.transport.hello(self.uid) or hello
        self._rename(str(again.get("worker") or self.name))
        self.learner = self.make_learner(int(again.get("workers") or 1))

    def _rename(self, name: str) -> None:
        self.name = self.outbox.name = name

    # --- the loop -----------------------------------------------------------------

    def run(self) -> Summary:
        if self.learner is None:
            self.start()
        wait = 0.2
        unanswered_since: float | None = None
        worked = False  # since the allocator last gave its free pages back
        while True:
            if self.outbox.kept and not self.outbox.confirm():
                if self.outbox.busy:  # it answers 503: alive, so wait as long as it takes
                    unanswered_since = None
                    self.sleep(IDLE_WAIT_MAX)
                    continue
                unanswered_since = self._unanswered(unanswered_since)
                continue
            offer = self.transport.ask(self.uid, self.summary.counts.retries)
            self.summary.counts.retries += offer.retries
            if not offer.reachable:
                log.warning("%s: no answer to a request for work (%s)", self.name, offer.error)
                unanswered_since = self._unanswered(unanswered_since)
                continue
            unanswered_since = None
            if offer.worker:
                self._rename(offer.worker)
            if offer.task is not None:
                wait = 0.2
                self._do(offer.task)
                worked = True
                continue
            if offer.finished:
                log.info("%s: the run is finished", self.name)
                break
            if offer.surplus:
                log.info("%s: no work for this worker: %s", self.name, offer.reason)
                break
            # Nothing yet (a round closing, a client's next slice held elsewhere): wait,
            # longer each time, never longer than the aggregator or IDLE_WAIT_MAX says.
            if worked:  # what the tasks freed goes back to the system while this one waits
                allocator.release()
                worked = False
            self.sleep(min(wait, offer.retry_after, IDLE_WAIT_MAX))
            wait = min(wait * 2, IDLE_WAIT_MAX)
        self.outbox.settle()
        return self.summary

    def _unanswered(self, since: float | None) -> float:
        now = self.clock()
        since = now if since is None else since
        if now - since >= LOST_SECONDS:
            raise AggregatorUnreachable(
                f"the aggregator at {self.transport.base_url} did not answer for "
                f"{LOST_SECONDS:.0f}s"
            )
        self.sleep(1.0)
        return since

    def _do(self, task: Task) -> None:
        if isinstance(task, TrainTask):
            self._train(task)
        elif isinstance(task, SecaggTask):
            self.secagg.phase(task, self.uid, self.name)
        else:
            self._evaluate(task)

    # --- training -----------------------------------------------------------------

    def _indices(self, task: TrainTask) -> np.ndarray:
        """The samples of the task's client, checked against the plan's SHA-256."""
        key = json.dumps(task.partition, sort_keys=True)
        if key not in self._plans:
            assert self.learner is not None
            self._plans = {key: partition.make(task.partition, self.learner.labels)}
        parts = self._plans[key]
        number = task.client_number
        if not 1 <= number <= len(parts):
            raise ProtocolError(f"task {task.id} names {task.client}, not in the plan")
        part = parts[number - 1]
        if part.sha256 != task.sha256:
            raise ProtocolError(
                f"the samples of {part.id} here do not match the aggregator's plan (SHA-256 "
                f"{part.sha256[:12]} here, {task.sha256[:12]} there): this worker's "
                "MNIST files or fedsim version differ from those that made partitions.json"
            )
        if task.slice is not None:
            return partition.slice_indices(part, task.slice, self.settings.num_images_train)
        return part.indices

    def _announce(self, task: TrainTask, indices: np.ndarray) -> None:
        client = task.client
        if client not in self._seen_clients:
            self._seen_clients.add(client)
            self.summary.clients.append(client)
            if task.slices:
                parts = self._plans[next(iter(self._plans))]
                whole = parts[task.client_number - 1].indices
                log.info(
                    "%s %s: slices %s (samples %d-%d)",
                    self.name,
                    client,
                    task.slices,
                    int(whole.min()),
                    int(whole.max()),
                )
        if not self._announced:
            self._announced = True
            t = task.train
            log.info(
                "%s: %s, %d epochs, batch %d, %s learning rate %g%s",
                self.name,
                t.model or self.settings.model,
                t.epochs,
                t.batch_size,
                t.optimizer,
                t.learning_rate,
                f" momentum {t.sgd_momentum:g}" if t.optimizer == "sgd" else "",
            )

    def _ensure_model(self, version: int, what: str) -> None:
        """Make the worker's copy the current model, downloading only when stale: the ETag
        (version and digest) says, also when a restart made this version from other weights.
        Under CLOCK=virtual the task's own `version`: the one its client started from in
        simulated time, which newer versions may have followed (asynchronous rules)."""
        fp16 = self.settings.compression_down == "fp16"
        wanted = version if self.settings.clock == "virtual" else None
        pulled = self.transport.pull(etag=self.model.etag, version=wanted, fp16=fp16)
        self.summary.counts.retries += pulled.retries
        self.summary.counts.bytes_pulled += pulled.bytes
        if not pulled.ok:
            self.summary.pulls_failed += 1
            log.warning(
                "%s %s pull  failed after %d tries (%s): training on version %d it has",
                self.name,
                what,
                pulled.retries + 1,
                pulled.error,
                self.model.version,
            )
            if self.model.tensors is None:
                raise AggregatorUnreachable("could not download the model even once")
            return
        if pulled.not_modified:
            return
        assert pulled.tensors is not None
        self._check_layout(pulled.tensors)
        self.model = LocalModel(pulled.version or 0, pulled.etag, pulled.tensors, fp16)
        log.info(
            "%s %s pull  version %d (%s, %d bytes, retries %d)",
            self.name,
            what,
            self.model.version,
            "fp16" if fp16 else "float32",
            pulled.bytes,
            pulled.retries,
        )

    def _check_layout(self, tensors: dict[str, np.ndarray]) -> None:
        try:
            weights.validate(tensors, models.SHAPES[self.settings.model])
        except weights.WeightsError as exc:
            raise weights.WeightsError(
                exc.status,
                f"the aggregator serves a model that is not MODEL={self.settings.model} "
                f"({exc.reason}); give both the same MODEL",
            ) from None

    def _train(self, task: TrainTask) -> None:
        assert self.learner is not None
        indices = self._indices(task)
        self._announce(task, indices)
        what = describe(task.client, task.slice, task.round) + (
            f" ({task.attack.kind} attacker)" if task.attack else ""
        )
        if pacing.drops(task):  # its client fails part-way: nothing is trained or pushed
            self.summary.dropped += 1
            self.summary.counts.retries += pacing.drop(
                self.name, what, task, self.transport, self.uid
            )
            return
        self._ensure_model(task.base_version, what)
        assert self.model.tensors is not None
        base = self.model.version
        fields = task.to_json()  # each stage reads its own fields of the task
        try:
            labels = self.stages.relabel(fields, self.learner.labels[indices])
            tensors, trained = self.learner.train(
                self.model.tensors, indices, task.train, task.seed, labels=labels
            )
            if (bad := pacing.non_finite(tensors)) is not None:  # nothing to push: the run stops
                self.summary.diverged += 1
                self.summary.counts.retries += pacing.diverged(
                    self.name, what, task, self.transport, self.uid, f"{bad} from version {base}",
                    trained.loss,
                )  # fmt: skip
                return
            sent = self.stages.worker(pipeline.Outgoing(self.model.tensors, tensors, fields))
            tensors = dict(sent.tensors)
        except ValueError as exc:
            raise ProtocolError(f"task {task.id}: {exc}") from None
        self.summary.trained += 1
        # CLOCK=real: a slow client (or a slow link) really takes longer.
        pace = pacing.wait(task.profile, trained.seconds, self.model.tensors, tensors, self.sleep)
        log.info(
            "%s %s train samples %d loss %.4f acc %.4f (%.1fs)",
            self.name,
            what,
            trained.samples,
            trained.loss,
            trained.accuracy,
            trained.seconds,
        )
        meta = UpdateMeta(
            client_id=task.client,
            update_id=task.id,
            base_version=base,
            num_samples=trained.samples,
            task=task.id,
            lease=task.lease,
            slice=None if task.slice is None else str(task.slice),
            slices=task.slices or None,
            round=task.round,
            # Metrics are optional; a diverged loss is left out rather than sent as NaN.
            loss=trained.loss if math.isfinite(trained.loss) else None,
            accuracy=trained.accuracy if math.isfinite(trained.accuracy) else None,
            retries=self.summary.counts.retries,
            stages=dict(sent.meta),  # a stage's fields never override the ones above
        )
        if task.secagg is not None:  # masked: pushed once, never kept (client/secagg.py)
            if "secagg" not in sent.meta:  # never a plain update where a masked one is due
                raise ProtocolError(f"task {task.id} is to be masked: set SECAGG=true here too")
            self.secagg.push_masked(task, tensors, self.uid, self.name)
            return
        self.outbox.push(tensors, meta, note=pace.note())

    # --- evaluation ---------------------------------------------------------------

    def _evaluate(self, task: EvalTask) -> None:
        assert self.learner is not None
        version = task.version
        # A version is scored in float32, also when training pulls it in half precision.
        if self.model.version == version and self.model.tensors is not None and not self.model.fp16:
            tensors = self.model.tensors
        else:
            pulled = self.transport.pull(version=version)
            self.summary.counts.retries += pulled.retries
            self.summary.counts.bytes_pulled += pulled.bytes
            if pulled.tensors is None:
                log.warning(
                    "%s evaluate version %d: could not get it (%s)",
                    self.name,
                    version,
                    pulled.error,
                )
                return
            self._check_layout(pulled.tensors)
            tensors = pulled.tensors
        accuracy, loss, seconds = self.learner.evaluate(tensors)
        self.summary.evaluations += 1
        log.info(
            "%s evaluate version %d: test accuracy %.4f loss %.4f (%.1fs)",
            self.name,
            version,
            accuracy,
            loss,
            seconds,
        )
        status, answer, retries = self.transport.report(
            Evaluation(self.uid, task.id, task.lease, accuracy, loss)
        )
        self.summary.counts.retries += retries
        if status != 200:
            log.info(
                "%s evaluate version %d: not recorded (%s)",
                self.name,
                version,
                answer.get("detail") or "no answer",
            )
