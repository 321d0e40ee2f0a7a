"""A worker's Trainer on real MNIST and TensorFlow: virtual clients, fresh optimizers, scoring."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from fedsim import models, tfruntime
from fedsim.data import partition

SETTINGS = {"epochs": 1, "batch_size": 50, "learning_rate": 0.05, "optimizer": "sgd"}


def rss_mb() -> float:
    """This process's resident memory now, in MB (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


@pytest.fixture(scope="module")
def trainer(mnist_dir):
    tfruntime.configure(2)
    from fedsim.client.training import Trainer

    return Trainer(mnist_dir, verify=True, model="mlp", seed=42)


def test_one_worker_trains_twenty_clients_in_constant_memory(trainer):
    plan = {"PARTITION": "iid", "SEED": 42, "NUM_CLIENTS": 100}
    parts = partition.make(plan, trainer.labels)
    tensors = models.initial_weights("mlp", 42)
    after = []
    for i, part in enumerate(parts[:20]):
        tensors, trained = trainer.train(tensors, part.indices, SETTINGS, seed=i)
        assert trained.samples == 600 and np.isfinite(trained.loss)
        gc.collect()
        after.append(rss_mb())
    growth = after[19] - after[1]
    print(f"memory after client 2: {after[1]:.1f} MB, after client 20: {after[19]:.1f} MB")
    # A few MB of warm-up (allocator pools) come first; a leak of even one model per
    # client (0.8 MB) would show as 8 MB more between the 10th and the 20th.
    assert growth < 10, f"memory grew by {growth:.1f} MB from the 2nd to the 20th client"
    assert after[19] - after[9] < 4, f"memory grew from the 10th to the 20th client: {after}"
    # Twenty clients of a partition, one after another, did learn.
    accuracy, loss, _ = trainer.evaluate(tensors)
    assert accuracy > 0.85 and loss < 0.6


def test_each_task_starts_from_a_fresh_optimizer_and_repeats_with_its_seed(trainer):
    tensors = models.initial_weights("mlp", 7)
    indices = np.arange(1000)
    first, _ = trainer.train(tensors, indices, SETTINGS, seed=3)
    trainer.train(tensors, np.arange(1000, 2000), SETTINGS, seed=4)  # leaves momentum behind
    again, _ = trainer.train(tensors, indices, SETTINGS, seed=3)
    for name in first:
        np.testing.assert_allclose(first[name], again[name], rtol=1e-5, atol=1e-6)
    other, _ = trainer.train(tensors, indices, SETTINGS, seed=5)  # another shuffle
    assert not np.allclose(first["output/bias"], other["output/bias"])


def test_evaluate_scores_an_untrained_model_near_chance(trainer):
    accuracy, loss, seconds = trainer.evaluate(models.initial_weights("mlp", 1))
    assert 0.0 < accuracy < 0.3 and loss > 1.5 and seconds >= 0
