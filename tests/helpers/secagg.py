"""Secure aggregation's four phases run in this process, with clients that drop out."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from fedsim.pipeline.secagg import party, server


def run_attempt(
    secret: bytes,
    nonce: bytes,
    inputs: Mapping[int, np.ndarray],
    weights: Mapping[int, int],
    threshold: int,
    *,
    round_no: int = 1,
    drop_after_keys: Collection[int] = (),
    drop_after_shares: Collection[int] = (),
    drop_before_unmask: Collection[int] = (),
) -> tuple[server.Attempt, np.ndarray, int]:
    """Every phase of one attempt; each drop set leaves out its clients from then on.
    Returns the attempt, the unmasked mean and the survivors' total count; raises Abandoned."""
    clients = sorted(inputs)
    size = next(iter(inputs.values())).size
    a = server.Attempt(round_no, nonce, clients, weights, threshold, size)
    for u in clients:
        a.add_keys(u, *party.advertise(secret, u, round_no, nonce))
    u1 = a.close_keys()
    for u in u1:
        if u not in drop_after_keys:
            cts = party.share_keys(secret, u, round_no, nonce, a.public_keys(u1), threshold)
            a.add_shares(u, cts)
    u2 = a.close_shares()
    for u in u2:
        if u not in drop_after_shares:
            y = party.masked_input(
                secret, u, round_no, nonce, inputs[u], weights[u], a.public_keys(u2)
            )
            a.add_masked(u, y)
    a.close_masked()
    for u in a.u3:
        if u not in drop_before_unmask:
            answer = party.unmask(
                secret, u, round_no, nonce, a.public_keys(u1), a.shares_for(u), a.u3, a.dropped
            )
            a.add_unmask(u, answer)
    mean, weight = a.close_unmask()
    return a, mean, weight


def weighted_mean(
    inputs: Mapping[int, np.ndarray], weights: Mapping[int, int], among: Collection[int]
) -> np.ndarray:
    """The plain weighted mean in float64, the reference."""
    total = sum(weights[u] for u in among)
    return sum(weights[u] * np.asarray(inputs[u], np.float64) for u in among) / total


class SmallLearner:
    """A fake learner whose trained weights are small (within fixed point's clip range):
    every weight becomes (first sample index mod 1000) / 1000, so each client's update is
    known. `trained` maps the first index to that value."""

    def __init__(self, labels: np.ndarray) -> None:
        from helpers.fakes import FakeLearner

        self._inner = FakeLearner(labels=labels)
        self.labels = labels
        self.trained: dict[int, float] = {}

    def train(self, tensors, indices, settings, seed, *, labels=None):
        out, trained = self._inner.train(tensors, indices, settings, seed, labels=labels)
        first = int(np.asarray(indices)[0])
        value = (first % 1000) / 1000
        self.trained[first] = value
        return {name: np.full(t.shape, value, np.float32) for name, t in out.items()}, trained

    def evaluate(self, tensors):
        return self._inner.evaluate(tensors)


# --- the service driven by hand through Flask's test client --------------------------------

SECAGG = {
    "AGGREGATION": "fedavg",
    "PARTITION": "iid",
    "NUM_CLIENTS": 10,
    "CLIENTS_PER_ROUND": 5,
    "ROUNDS": 1,
    "SECAGG": "true",
    "TASK_TIMEOUT": 10,
    "ROUND_DEADLINE": 100,
}


def value_of(client: str) -> float:
    """The value every weight of `client`'s trained model takes: distinct per client."""
    return int(client.split("-")[1]) / 100 + 0.0137


class Driver:
    """Plays the workers: asks for tasks and answers them, except the (client, phase) pairs
    in `drop` ("keys", "shares", "masked", "unmask"), which it takes and never answers."""

    def __init__(self, client, key_file, drop=()) -> None:
        from fedsim.client.secagg import SecaggWorker
        from fedsim.pipeline.secagg.stage import Mask

        self.client, self.drop = client, set(drop)
        self.phases = SecaggWorker(key_file, transport=None)  # type: ignore[arg-type]
        self.mask = Mask(key_file)
        self.answered: list[tuple[str, str]] = []
        self.sent: dict[str, np.ndarray] = {}  # client -> the plain model it trained

    def step(self, worker: str = "wk-1") -> dict | None:
        """Ask once and answer; the offer's task, or None when there was none."""
        offer = self.client.post("/v1/tasks", json={"worker": worker}).get_json()
        task = offer.get("task")
        if task is None or task["kind"] == "evaluate":
            return task
        phase = task.get("phase", "masked")
        if (task["client"], phase) in self.drop:
            return task
        response = self.answer(task, worker)
        assert response.status_code == 200, response.get_json()
        self.answered.append((task["client"], phase))
        return task

    def answer(self, task: dict, worker: str = "wk-1"):
        from fedsim.protocol import SecaggReport, SecaggTask

        if task["kind"] == "secagg":
            parsed = SecaggTask.from_json(task)
            message = self.phases.message(parsed)
            report = SecaggReport(
                worker, parsed.id, parsed.lease, parsed.nonce, parsed.phase, message
            )
            return self.client.post("/v1/secagg", json=report.to_json())
        return self.client.post("/v1/secagg/masked", data=self.masked_body(task, worker))

    def masked_body(self, task: dict, worker: str = "wk-1") -> bytes:
        from fedsim import models, weights
        from fedsim.pipeline.base import Outgoing

        base = {n: np.zeros(s, np.float32) for n, s in models.SHAPES["mlp"]}
        trained = {
            n: np.full(b.shape, value_of(task["client"]), np.float32) for n, b in base.items()
        }
        self.sent[task["client"]] = trained
        out = self.mask.worker(Outgoing(base, trained, task))
        meta = {"task": task["id"], "lease": task["lease"], "nonce": task["secagg"]["nonce"],
                "client_id": task["client"], "worker": worker}  # fmt: skip
        return weights.encode(out.tensors, meta, wire=True)

    def run(self, clock, limit: int = 200) -> None:
        """Ask and answer until the run is finished; when nothing is offered, let the
        clock pass TASK_TIMEOUT (a dropped client's lease runs out)."""
        for _ in range(limit):
            offer = self.client.post("/v1/tasks", json={"worker": "wk-1"}).get_json()
            if offer.get("finished"):
                return
            task = offer.get("task")
            if task is None:
                clock.advance(11)
                continue
            if task["kind"] == "evaluate":
                self.client.post("/v1/evaluations", json={"worker": "wk-1", "task": task["id"],
                                 "lease": task["lease"], "accuracy": 0.5, "loss": 1.0})  # fmt: skip
                continue
            phase = task.get("phase", "masked")
            if (task["client"], phase) in self.drop:
                continue
            response = self.answer(task)
            assert response.status_code == 200, response.get_json()
            self.answered.append((task["client"], phase))
        raise AssertionError("the run did not finish")
