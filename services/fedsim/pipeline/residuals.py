"""Error feedback's residuals, one file per logical client in a folder every worker shares.

Top-k with error feedback (`compress.feedback`) keeps, per logical client, what its
updates have not sent yet. A logical client is trained by whichever worker gets
its task, so the residual lives in WORKER_STATE_DIR (Compose: the named volume
`worker-state` at /state in every worker; local runs: a folder of the run), as
`<client>.safetensors`, written atomically (a temporary file, fsync, rename).

A file holds the residual e after the task it follows, float32 under `e/<tensor>`,
and that task's sent top-k entries (`sent/<tensor>:index`, int32 flat indices, and
`:value`, the half-precision values widened to float32), with metadata:
the run, the client, the task id and the task's base version. Reading it for a task:

- another task of the same run and client, from a base version not older than the
  file's: e;
- the same task again (its earlier attempt expired or was refused, so none of it was
  applied): e + sent, so what that attempt sent is not lost either;
- a file of another run or client, from a later version, of another layout, or
  unreadable: ignored with a warning line (the client starts from e = 0).

The run is the aggregator's run id in the task (`TrainTask.run`), drawn from its
lease key: a new run (a new MODEL_DIR) never takes an old run's residuals, a
resumed one does. Without a folder the residuals stay in this worker's memory.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedsim import weights
from fedsim.checkpoints import write_atomic

log = logging.getLogger("fedsim.pipeline")

FORMAT = "fedsim-residual-1"
_CLIENT = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # a file name of its own: client-17


class Residuals:
    """The residuals of the logical clients this worker trains: in `folder`, else in memory."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._memory: dict[str, bytes] = {}  # without a folder, or when writing it failed

    def path(self, client: str) -> Path | None:
        if self.folder is None or not _CLIENT.fullmatch(client):
            return None
        return self.folder / f"{client}.safetensors"

    def load(
        self, client: str, run: str, task: str, base_version: int, layout: weights.Layout
    ) -> dict[str, np.ndarray] | None:
        """The residual `task` of `client` starts from, or None (zero): see the module."""
        path = self.path(client)
        # In memory: no folder, or this worker's last write of it failed (the newest it has).
        raw = self._memory.get(client)
        where = str(path) if raw is None and path is not None else f"residual of {client} in memory"
        if raw is None and path is not None:
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                return None
            except OSError as exc:
                log.warning("%s cannot be read (%s): ignored, %s starts from 0", path, exc, client)
                return None
        if raw is None:
            return None
        try:
            tensors, meta = weights.decode(raw, dtypes=("F32", "I32"))
        except weights.WeightsError as exc:
            log.warning("%s is corrupt (%s): ignored, %s starts from 0", where, exc.reason, client)
            return None
        why = _foreign(meta, client, run, base_version)
        if why:
            log.warning("%s %s: ignored, %s starts from 0", where, why, client)
            return None
        try:
            residual = _dense(tensors, layout, again=meta.get("task") == task)
        except ValueError as exc:
            log.warning("%s does not fit the model (%s): ignored", where, exc)
            return None
        return residual

    def save(
        self,
        client: str,
        run: str,
        task: str,
        base_version: int,
        residual: Mapping[str, np.ndarray],
        sent: Mapping[str, tuple[np.ndarray, np.ndarray]],
    ) -> None:
        """Keep `residual` (e after `task`) and what `task` sent (flat indices, values); a
        write that fails is logged and the residual kept in memory."""
        tensors: dict[str, np.ndarray] = {
            f"e/{n}": np.asarray(t, np.float32) for n, t in residual.items()
        }
        for name, (idx, values) in sent.items():
            tensors[f"sent/{name}:index"] = np.asarray(idx, np.int32)
            tensors[f"sent/{name}:value"] = np.asarray(values, np.float32)
        meta = {
            "format": FORMAT,
            "run": run,
            "client": client,
            "task": task,
            "base_version": base_version,
        }
        body = weights.encode(tensors, meta, wire=True)
        path = self.path(client)
        if path is None:
            self._memory[client] = body
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, body)
        except OSError as exc:
            log.warning(
                "%s cannot be written (%s): the residual of %s stays in memory", path, exc, client
            )
            self._memory[client] = body
            return
        self._memory.pop(client, None)


def _foreign(meta: Mapping[str, str], client: str, run: str, base_version: int) -> str:
    """Why a residual file is not this client's in this run, or ""."""
    if meta.get("format") != FORMAT:
        return "is not a residual file"
    if meta.get("client") != client:
        return f"belongs to {weights.quote(meta.get('client', ''), 40)}"
    if meta.get("run") != run:
        return "is of another run"
    saved = meta.get("base_version", "")
    if not saved.isdigit() or int(saved) > base_version:
        return f"follows version {weights.quote(saved, 20)}, later than this task's {base_version}"
    return ""


def _dense(
    tensors: Mapping[str, np.ndarray], layout: weights.Layout, *, again: bool
) -> dict[str, np.ndarray]:
    """e per tensor of `layout`; `again` (the same task once more): e + what it sent."""
    out = {}
    for name, shape in layout:
        e = tensors.get(f"e/{name}")
        if (
            e is None
            or e.shape != tuple(shape)
            or e.dtype != np.float32
            or not np.isfinite(e).all()
        ):
            raise ValueError(f"e/{name} missing, not float32 {tuple(shape)} or not finite")
        e = e.copy()
        if again:
            idx, values = tensors.get(f"sent/{name}:index"), tensors.get(f"sent/{name}:value")
            if idx is None or values is None or idx.shape != values.shape:
                raise ValueError(f"sent/{name} missing")
            if idx.size and (idx.min() < 0 or idx.max() >= e.size):
                raise ValueError(f"sent/{name}:index out of range")
            flat = e.ravel()
            np.add.at(flat, idx.astype(np.int64), values)
            e = flat.reshape(e.shape)
        out[name] = e
    return out
