"""Reading one client upload: safetensors bytes -> a validated `Update`, or a precise refusal.

Every 4xx an upload can get is decided here: unreadable bytes (400), metadata
that breaks the protocol (`fedsim.protocol.UpdateMeta`: 400, or 422 for
num_samples), weights of the wrong layout, not finite or out of bounds (422, the
pipeline's validate stage), and a claim to a task the sender does not hold
(`check_claim`: 403 for a task's id without its lease, 409 for a lease never
handed out with the task). The checks run outside the state lock, so a slow or
bad upload never holds up the others.
"""

from __future__ import annotations

from collections.abc import Callable

from fedsim import pipeline, weights
from fedsim.aggregator.strategies import Refused, Update
from fedsim.aggregator.tasks import ids
from fedsim.config import TRAIN_IMAGES
from fedsim.protocol import Invalid, UpdateMeta

Tensors = pipeline.base.Tensors
MAX_WEIGHT = pipeline.MAX_WEIGHT  # bound of an update's and the global model's weights


class BadUpdate(Exception):
    """An upload refused before it reaches the strategy: HTTP `status`, short `code`."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        self.status, self.code, self.detail = status, code, detail
        super().__init__(detail)


def parse(
    body: bytes,
    receive: Callable[[Tensors, pipeline.Upload], Tensors],
    *,
    find_base: Callable[[int], Tensors | None] = lambda version: None,
    dtypes: frozenset[str] | tuple[str, ...] = ("F32",),
) -> Update:
    """The update in `body`, through the pipeline's receive stages (`Pipeline.receive`: a
    codec decodes onto the model `find_base` gives for the update's base version, then
    the validate stage checks the model's layout). `dtypes`: the safetensors dtypes a body
    may hold (F32, and a codec's). Raises BadUpdate."""
    try:
        tensors, header = weights.decode(body, dtypes=dtypes, copy=False)  # read-only views
    except weights.WeightsError as exc:
        code = "unreadable" if exc.status == 400 else "invalid_weights"
        raise BadUpdate(exc.status, code, exc.reason) from None
    try:
        meta = UpdateMeta.from_json(header, max_samples=TRAIN_IMAGES)
    except Invalid as exc:
        raise BadUpdate(exc.status, exc.code, exc.detail) from None
    upload = pipeline.Upload(meta.stages, meta.base_version, find_base)
    try:
        tensors = receive(tensors, upload)  # decoded, then validated: layout, finite, bounded
    except pipeline.Rejected as exc:
        code = "stale" if exc.status == 409 else "invalid_weights"
        raise BadUpdate(exc.status, code, exc.reason) from None
    return Update(
        meta.client_id,
        meta.update_id,
        meta.base_version,
        meta.num_samples,
        tensors,
        meta.extra(),
        meta.task,
        meta.lease,
    )


def check_claim(update: Update, check_genuine: Callable[[str, str], None]) -> None:
    """Refuse an update that claims a task its sender does not hold (nothing changes).

    Task ids are predictable: an update without a task may not take one (403), so a
    hand-started client's ids (a UUID each) never collide with a task's; a task's update
    needs a lease handed out with that task (`check_genuine`, the queue's: 409), also
    when the task is done, so that a repeat is acknowledged only to its holder.
    """
    if update.task_id is None:
        if ids.is_task(update.update_id):
            raise Refused(
                "reserved_id",
                f"update_id {update.update_id} is spelt as a task id: only the worker that "
                "holds that task's lease may send its result; an update without a task "
                "needs an id of its own (the hand-started client sends a UUID)",
                status=403,
            )
        return
    check_genuine(update.task_id, update.lease)
