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
