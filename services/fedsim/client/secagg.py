"""A worker's side of secure aggregation: do a phase task for its logical client and report
it, and push a masked input (docs/secagg.md).

Each phase is a pure function of the worker secret and the task (pipeline/secagg/party.py),
so this worker keeps nothing between phases and any worker can take any client's next
phase. A task the client must refuse (asked for both shares of one client, keys that
are not the ones it advertised) is logged and not answered: its lease runs out. A masked
input is pushed once, not kept in the outbox: if it is lost, the client dropped, and the
round goes on without it (its masks are removed with the others' shares).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedsim import weights
from fedsim.client.transport import Transport
from fedsim.pipeline.secagg import party
from fedsim.pipeline.secagg.stage import read_secret
from fedsim.protocol import SecaggReport, SecaggTask, TrainTask, client_number
from fedsim.protocol.secagg import blobs_from_json, blobs_json, keys_from_json

log = logging.getLogger("fedsim.client")


class SecaggWorker:
    def __init__(self, key_file: Any, transport: Transport) -> None:
        self.key_file, self.transport = key_file, transport
        self._secret = b""

    def secret(self) -> bytes:
        if not self._secret:
            self._secret = read_secret(self.key_file)
        return self._secret

    def message(self, task: SecaggTask) -> dict[str, str]:
        """The phase's message for the task's client. Raises party.Refusal."""
        n, nonce, secret = task.number, bytes.fromhex(task.nonce), self.secret()
        if task.phase == "keys":
            c_pk, s_pk = party.advertise(secret, n, task.round, nonce)
            return {"c_pk": c_pk.hex(), "s_pk": s_pk.hex()}
        keys = keys_from_json(task.keys)
        if task.phase == "shares":
            return blobs_json(party.share_keys(secret, n, task.round, nonce, keys, task.threshold))
        received = blobs_from_json(task.received, "received")
        survivors = [client_number(c) for c in task.survivors]
        dropped = [client_number(c) for c in task.dropped]
        answer = party.unmask(secret, n, task.round, nonce, keys, received, survivors, dropped)  # type: ignore[arg-type]
        return blobs_json(answer)

    def phase(self, task: SecaggTask, worker: str, name: str) -> bool:
        """Do a phase task and report it; whether the aggregator recorded it."""
        try:
            message = self.message(task)
        except party.Refusal as exc:
            log.warning("%s %s round %d %s: refused: %s", name, task.client, task.round,
                        task.phase, exc)  # fmt: skip
            return False
        report = SecaggReport(worker, task.id, task.lease, task.nonce, task.phase, message)
        status, answer, _ = self.transport.send("/v1/secagg", json=report.to_json())
        log.info("%s %s round %d %s: %s", name, task.client, task.round, task.phase,
                 "recorded" if status == 200 else f"not recorded ({_why(status, answer)})")  # fmt: skip
        return status == 200

    def push_masked(
        self, task: TrainTask, tensors: Mapping[str, np.ndarray], worker: str, name: str
    ) -> bool:
        """Push the masked input of a phase-3 training task once; whether it was accepted."""
        assert task.secagg is not None
        meta = {"task": task.id, "lease": task.lease, "nonce": task.secagg.nonce,
                "client_id": task.client, "worker": worker}  # fmt: skip
        body = weights.encode(tensors, meta, wire=True)
        status, answer, _ = self.transport.send(
            "/v1/secagg/masked", data=body, headers={"Content-Type": "application/octet-stream"}
        )
        log.info("%s %s round %s masked input push: %s", name, task.client, task.round,
                 "accepted" if status == 200 else f"not accepted ({_why(status, answer)})")  # fmt: skip
        return status == 200


def _why(status: int | None, answer: Mapping[str, Any]) -> str:
    return f"{status or 'no answer'}: {answer.get('detail') or answer.get('error') or ''}"
