"""Training and scoring for a worker: one Keras model, any number of logical clients.

A worker trains logical clients one after another on one TensorFlow runtime
(virtual clients): the model is built once, each task's weights are swapped in,
each client's images are taken from the arrays loaded once (kept as uint8 and
scaled per task, so memory is the model plus the data set, not per client), and
each task starts from a fresh optimizer state, as a real client's would.
`fedsim.tfruntime.configure` must run before the first Trainer is made.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsim import models
from fedsim.data import mnist
from fedsim.tfruntime import quiet as quiet_tensorflow

__all__ = ["Trained", "Trainer", "quiet_tensorflow"]


@dataclass(frozen=True)
class Trained:
    samples: int
    loss: float
    accuracy: float
    seconds: float


class Trainer:
    """The model (built once per optimizer kind) and MNIST, loaded once."""

    def __init__(self, data_dir: Path, *, verify: bool, model: str, seed: int) -> None:
        self.data_dir, self.verify, self.model_name, self.seed = data_dir, verify, model, seed
        self.images, self.labels = mnist.load_pair(data_dir, "train", verify=verify)
        self._test: tuple[np.ndarray, np.ndarray] | None = None
        self._models: dict[str, Any] = {}

    def _model(self, optimizer: str, learning_rate: float) -> Any:
        model = self._models.get(optimizer)
        if model is None:
            model = models.build(
                self.model_name, seed=self.seed, learning_rate=learning_rate, optimizer=optimizer
            )
            self._models[optimizer] = model
        return model

    def train(
        self,
        tensors: Mapping[str, np.ndarray],
        indices: np.ndarray,
        settings: Mapping[str, Any],
        seed: int,
    ) -> tuple[dict[str, np.ndarray], Trained]:
        """Train from `tensors` on the images at `indices`; the new weights and the metrics.

        `settings`: epochs, batch_size, learning_rate, optimizer (the task's).
        """
        import keras

        model = self._model(str(settings["optimizer"]), float(settings["learning_rate"]))
        models.set_weights(model, dict(tensors))
        fresh_optimizer(model.optimizer, float(settings["learning_rate"]))
        keras.utils.set_random_seed(seed)  # the task's shuffling, whichever worker runs it
        x = mnist.scale(self.images[indices])
        y = np.asarray(self.labels[indices], dtype=np.int64)
        started = time.monotonic()
        history = model.fit(
            x,
            y,
            epochs=int(settings["epochs"]),
            batch_size=int(settings["batch_size"]),
            shuffle=True,
            verbose=0,
        )
        trained = Trained(
            len(x),
            float(history.history["loss"][-1]),
            float(history.history["accuracy"][-1]),
            time.monotonic() - started,
        )
        return models.get_weights(model), trained

    def evaluate(self, tensors: Mapping[str, np.ndarray]) -> tuple[float, float, float]:
        """(accuracy, loss, seconds) of `tensors` on the 10,000 test images."""
        if self._test is None:
            images, labels = mnist.load_pair(self.data_dir, "t10k", verify=self.verify)
            self._test = (mnist.scale(images), np.asarray(labels, dtype=np.int64))
        model = next(iter(self._models.values()), None) or self._model("sgd", 0.01)
        models.set_weights(model, dict(tensors))
        started = time.monotonic()
        loss, accuracy = model.evaluate(*self._test, batch_size=1000, verbose=0)
        return float(accuracy), float(loss), time.monotonic() - started


def fresh_optimizer(optimizer: Any, learning_rate: float) -> None:
    """Zero the optimizer's state (step count, momentum, moments) and set its step size.

    Cheaper than a new optimizer, and it keeps the compiled training step, so a
    worker's memory does not grow with the number of tasks.
    """
    for variable in optimizer.variables:
        variable.assign(np.zeros(variable.shape, dtype=variable.dtype))
    optimizer.learning_rate = learning_rate
