"""The original hand-started client: typed `Client Id` and `Dataset Range`, its own slices.

Started in a terminal, `python -m fedsim.client` asks for a Client Id (any
text, as the original took; Enter alone makes it a worker that takes tasks
instead) and a Dataset Range `l r` of slice numbers. It then trains its slices
in order, pulling before each and pushing after each, outside the aggregator's
task plan. Only asynchronous rules take such updates: round rules count only
the updates of the clients they sample.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from fedsim import pipeline
from fedsim.client.outbox import Outbox
from fedsim.client.records import Learner, LocalModel, Summary
from fedsim.client.transport import Transport
from fedsim.client.worker import AggregatorUnreachable
from fedsim.config import Settings
from fedsim.data import mnist
from fedsim.protocol import TrainSettings, UpdateMeta, valid_id

log = logging.getLogger("fedsim.client")


@dataclass(frozen=True)
class Typed:
    client_id: str
    first: int
    last: int


def ask(settings: Settings, ask: Callable[[str], str], say: Callable[[str], None]) -> Typed | None:
    """The original prompts; None when the Client Id is left empty (be a worker)."""
    n = settings.num_slices
    while True:
        client_id = ask("Client Id (Enter alone: take tasks from the aggregator): ").strip()
        if not client_id:
            return None
        if valid_id(client_id):
            break
        say("Client Id must be 1-128 printable characters")
    while True:
        raw = ask("Dataset Range: ").split()
        if len(raw) == 2 and all(part.isdigit() for part in raw):
            first, last = int(raw[0]), int(raw[1])
            if 1 <= first <= last <= n:
                return Typed(client_id, first, last)
        say(f"Dataset Range is two slice numbers l r with 1 <= l <= r <= {n}, e.g. '1 4'")


def run(
    settings: Settings, typed: Typed, transport: Transport, learner: Learner, outbox: Outbox
) -> Summary:
    """Train the typed range, one update per slice, as the original client did."""
    status = transport.status()
    if status is None:
        raise AggregatorUnreachable(f"no answer from the aggregator at {transport.base_url}")
    if status.get("mode") != "async":
        raise AggregatorUnreachable(
            f"the aggregator runs {status.get('strategy')}, in rounds of sampled clients: "
            "a client with its own range can join only asynchronous rules; press Enter at "
            "the Client Id prompt to run a worker instead"
        )
    summary = Summary(counts=outbox.counts, clients=[typed.client_id])
    model = LocalModel()
    name = typed.client_id
    size = settings.num_images_train
    train = TrainSettings(
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        optimizer=settings.optimizer,
        momentum=settings.momentum,
    )
    stages = pipeline.build(settings)  # COMPRESSION: its delta is encoded like a worker's
    base = model.tensors  # the global version pulled last: what a delta is measured from
    pull_next = True
    for slice_no in range(typed.first, typed.last + 1):
        if pull_next:
            outbox.confirm()
            pulled = transport.pull(etag=model.etag)
            summary.counts.retries += pulled.retries
            if pulled.tensors is not None:
                model = LocalModel(pulled.version or 0, pulled.etag, pulled.tensors)
                base = pulled.tensors
                log.info("%s slice %d pull  version %d", name, slice_no, model.version)
            elif not pulled.ok:
                summary.pulls_failed += 1
                log.warning("%s slice %d pull  failed (%s)", name, slice_no, pulled.error)
        if model.tensors is None:
            raise AggregatorUnreachable("could not download the model even once")
        start, stop = mnist.slice_range(slice_no, size)
        tensors, trained = learner.train(
            model.tensors, range(start, stop), train, settings.seed + slice_no
        )
        summary.trained += 1
        log.info(
            "%s slice %d train samples %d loss %.4f acc %.4f (%.1fs)",
            name,
            slice_no,
            trained.samples,
            trained.loss,
            trained.accuracy,
            trained.seconds,
        )
        update_id = uuid.uuid4().hex
        assert base is not None
        fields = {"client": name, "id": update_id, "base_version": model.version}
        sent = stages.worker(pipeline.Outgoing(base, tensors, fields))
        meta = UpdateMeta(
            client_id=name,
            update_id=update_id,
            base_version=model.version,
            num_samples=trained.samples,
            slice=str(slice_no),
            slices=f"{typed.first}-{typed.last}",
            loss=trained.loss if math.isfinite(trained.loss) else None,
            accuracy=trained.accuracy if math.isfinite(trained.accuracy) else None,
            retries=summary.counts.retries,
            stages=dict(sent.meta),
        )
        pushed = outbox.push(dict(sent.tensors), meta)
        # After a failed push the weights hold work the aggregator lacks: keep training
        # on them rather than overwrite them with the global model.
        pull_next = pushed.accepted
        if not pushed.accepted:
            model = LocalModel(model.version, "", tensors)
    outbox.settle()
    return summary
