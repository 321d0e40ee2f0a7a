"""Training and scoring for a worker: one Keras model, any number of logical clients.

A worker trains logical clients one after another on one TensorFlow runtime
(virtual clients): the model is built once, each task's weights are swapped in,
each client's images are taken from the arrays loaded once (kept as uint8 and
scaled per task, so memory is the model plus the data set, not per client), and
each task starts from a fresh optimizer state, as a real client's would. `fit`
feeds Keras' compiled training step the task's batches directly: Keras' own fit
would build a tf.data pipeline per task.

FedProx (Li et al., MLSys 2020, arXiv:1812.06127): with `proximal_mu` = μ > 0 in
the task's settings (`fedsim.protocol.TrainSettings`, which checks it) the client
minimises F_k(w) + (μ/2)‖w - w_t‖², w_t being the weights the task started from.
The gradient of the term, μ(w - w_t), is added to each weight's data gradient in
the training step of `Proximal`, a model that wraps the built one; w_t and μ live
in variables assigned per task, so nothing is traced or built again per task. μ
absent or 0 trains the plain model, as before.

`fedsim.tfruntime.configure` must run before the first Trainer is made.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsim import models
from fedsim.data import mnist
from fedsim.protocol import TrainSettings
from fedsim.protocol.tasks import DEFAULT_MOMENTUM
from fedsim.tfruntime import quiet as quiet_tensorflow

__all__ = ["Trained", "Trainer", "fit", "fresh_optimizer", "proximal_model", "quiet_tensorflow"]

NUM_CLASSES = 10


@dataclass(frozen=True)
class Trained:
    """One task's result. `loss` and `accuracy` are the last epoch's means on the task's
    training data (the labels it trained on) and `loss` is the data loss alone: without
    FedProx's (μ/2)‖w - w_t‖², so it compares across rules and with the test loss."""

    samples: int
    loss: float
    accuracy: float
    seconds: float


class Trainer:
    """The model (built once per optimizer kind) and MNIST, loaded once."""

    def __init__(self, data_dir: Path, *, verify: bool, model: str, seed: int) -> None:
        self.data_dir, self.verify, self.model_name, self.seed = data_dir, verify, model, seed
        self.images, self.labels = mnist.load_pair(data_dir, "train", verify=verify)
        self._test: Any = None  # the test set's batches (_test_set), made on first use
        # One compiled model per optimizer (kind, sgd's momentum): the momentum is fixed in
        # the compiled step, the step size is not (fresh_optimizer sets it per task).
        self._models: dict[tuple[str, float], Any] = {}
        self._proximal: dict[tuple[str, float], Any] = {}  # Proximal around _models[key]

    def _model(self, key: tuple[str, float], learning_rate: float) -> Any:
        model = self._models.get(key)
        if model is None:
            optimizer, momentum = key
            model = models.build(
                self.model_name,
                seed=self.seed,
                learning_rate=learning_rate,
                optimizer=optimizer,
                momentum=momentum,
            )
            self._models[key] = model
        return model

    def _proximal_model(self, key: tuple[str, float], learning_rate: float) -> Any:
        wrapper = self._proximal.get(key)
        if wrapper is None:
            wrapper = proximal_model(self._model(key, learning_rate))
            self._proximal[key] = wrapper
        return wrapper

    def train(
        self,
        tensors: Mapping[str, np.ndarray],
        indices: np.ndarray | Sequence[int],
        settings: TrainSettings | Mapping[str, Any],
        seed: int,
        *,
        labels: np.ndarray | None = None,
    ) -> tuple[dict[str, np.ndarray], Trained]:
        """Train from `tensors` on the images at `indices`; the new weights and the metrics.

        `settings`: the task's TrainSettings (or their JSON form): epochs, batch_size,
        learning_rate, optimizer, momentum (sgd's), and optionally proximal_mu (FedProx's
        μ; absent or 0 for plain training). Invalid (a ValueError) when they break the protocol.
        `labels`: the labels to train on, one per index, in place of the data set's
        (label-flipping attackers); the images are still those at `indices`.
        """
        import keras

        settings = TrainSettings.of(settings)
        mu = settings.mu
        y = self._labels(indices, labels)
        learning_rate = settings.learning_rate
        key = (settings.optimizer, settings.sgd_momentum if settings.optimizer == "sgd" else 0.0)
        model = self._model(key, learning_rate)
        models.set_weights(model, dict(tensors))
        fresh_optimizer(model.optimizer, learning_rate)
        if mu > 0:
            model = self._proximal_model(key, learning_rate)
            model.start(mu)  # w_t: the weights just set
        keras.utils.set_random_seed(seed)  # any random layer's draws, whichever worker trains
        x = mnist.scale(self.images[indices])
        started = time.monotonic()
        shuffle = np.random.default_rng(seed)  # the task's order, whichever worker trains it
        loss, accuracy = fit(model, x, y, settings.epochs, settings.batch_size, shuffle)
        trained = Trained(len(x), loss, accuracy, time.monotonic() - started)
        return models.get_weights(self._models[key]), trained

    def _labels(self, indices: np.ndarray | Sequence[int], labels: np.ndarray | None) -> np.ndarray:
        """The training labels for `indices`: the data set's, or `labels` once checked."""
        if labels is None:
            return np.asarray(self.labels[indices], dtype=np.int64)
        labels = np.asarray(labels)
        if labels.shape != (len(indices),):
            raise ValueError(
                f"labels must be one per index: shape {labels.shape}, {len(indices)} indices"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers 0-9, got dtype {labels.dtype}")
        if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            raise ValueError(
                f"labels must be integers 0-9, got values {labels.min()}..{labels.max()}"
            )
        return labels.astype(np.int64)

    def evaluate(self, tensors: Mapping[str, np.ndarray]) -> tuple[float, float, float]:
        """(accuracy, loss, seconds) of `tensors` on the 10,000 test images."""
        if self._test is None:
            self._test = self._test_set()
        model = next(iter(self._models.values()), None) or self._model(
            ("sgd", DEFAULT_MOMENTUM), 0.01
        )
        models.set_weights(model, dict(tensors))
        started = time.monotonic()
        loss, accuracy = model.evaluate(self._test, verbose=0)
        return float(accuracy), float(loss), time.monotonic() - started

    def _test_set(self) -> Any:
        """The 10,000 test images as a dataset of batches, kept as uint8 and scaled per batch
        as `mnist.scale` does (the same floats): 7.8 MB held where float32 would be 31 MB, and
        no copy of the whole set per evaluation. Batches of 100: the cnn's activations for
        1,000 images at once cost a worker about 140 MiB more at its peak, for no gain."""
        import tensorflow as tf

        images, labels = mnist.load_pair(self.data_dir, "t10k", verify=self.verify)
        data = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int64)))
        return data.batch(100).map(lambda x, y: (tf.cast(x, tf.float32) / 255.0, y))


def fit(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    batch_size: int,
    shuffle: np.random.Generator | None,
) -> tuple[float, float]:
    """Keras' `model.fit(x, y, epochs, batch_size)` without its data pipeline; the last
    epoch's mean loss and accuracy, as fit's History gives them.

    Each epoch's batches, in an order drawn from `shuffle` (None: in order), go to the
    model's compiled training step (Keras' `train_function`, given a Python iterator,
    runs one compiled step per batch, up to `steps_per_execution` batches a call), the
    metrics reset at each epoch as fit does. The steps are fit's: with `shuffle` None
    the weights are fit(shuffle=False)'s to float rounding (tests/test_training.py).
    Why not fit itself: it builds a new tf.data pipeline at every call, whose traced
    functions TensorFlow keeps; on 60-image clients that was most of a task's time,
    and a worker grew with every task (docs/benchmarks.md, "1,000 and 10,000 clients").
    """
    n = len(x)
    if n == 0:
        raise ValueError("a task must have at least one image")
    model.make_train_function()  # built once per model, then reused
    calls = math.ceil(math.ceil(n / batch_size) / model.steps_per_execution)
    for _ in range(epochs):
        model.reset_metrics()
        order = np.arange(n) if shuffle is None else shuffle.permutation(n)
        # Each batch is copied out when the step takes it, not the whole epoch at once.
        picks = (order[i : i + batch_size] for i in range(0, n, batch_size))
        batches = ((x[pick], y[pick]) for pick in picks)
        for _ in range(calls):
            model.train_function(batches)  # takes up to steps_per_execution batches
    logs = model.get_metrics_result()
    return float(logs["loss"]), float(logs["accuracy"])


def fresh_optimizer(optimizer: Any, learning_rate: float) -> None:
    """Zero the optimizer's state (step count, momentum, moments) and set its step size.

    Cheaper than a new optimizer, and it keeps the compiled training step, so a
    worker's memory does not grow with the number of tasks.
    """
    for variable in optimizer.variables:
        variable.assign(np.zeros(variable.shape, dtype=variable.dtype))
    optimizer.learning_rate = learning_rate


def proximal_model(model: Any) -> Any:
    """`model` (built and compiled) wrapped for FedProx; it shares the weights and optimizer.

    Call `start(mu)` after setting the task's weights, then `fit` as usual.
    """
    return _proximal_class()(model)


@functools.cache
def _proximal_class() -> type:
    # Defined on first use: importing Keras at module level would start TensorFlow
    # before `fedsim.tfruntime.configure` in every process that imports this module.
    import keras
    import tensorflow as tf

    class Proximal(keras.Model):
        """Trains `inner` on F(w) + (μ/2)‖w - w_t‖² (FedProx, Li et al. 2020, eq. 2).

        The training step is Keras' own (TensorFlow backend) with one change: the
        term's gradient μ(w - w_t) is added to each data gradient before the
        optimizer applies it. With μ = 0 it takes exactly the plain model's steps.
        The loss it reports is the data loss. w_t (one non-trainable variable per
        trainable weight) and μ are assigned by `start`, so the compiled step is
        reused from task to task.
        """

        def __init__(self, inner: keras.Model) -> None:
            super().__init__(name=f"{inner.name}_proximal")
            self.inner = inner
            self.mu = keras.Variable(0.0, dtype="float32", trainable=False, name="mu")
            self.anchors = [
                keras.Variable(np.zeros(w.shape, np.float32), trainable=False, name=f"anchor_{i}")
                for i, w in enumerate(inner.trainable_weights)
            ]
            self.compile(
                optimizer=inner.optimizer,  # shared: its state is the task's, fresh per task
                loss=inner.loss,
                metrics=["accuracy"],
                steps_per_execution=models.STEPS_PER_EXECUTION,
            )

        def start(self, mu: float) -> None:
            """Hold the inner model's current weights as w_t, and μ, for the next fit."""
            self.mu.assign(mu)
            for anchor, weight in zip(self.anchors, self.inner.trainable_weights, strict=True):
                anchor.assign(weight)

        def call(self, x: Any, training: bool = False) -> Any:
            return self.inner(x, training=training)

        def train_step(self, data: Any) -> dict[str, Any]:
            x, y = data
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
            weights = self.trainable_weights
            gradients = tape.gradient(loss, weights)
            gradients = [  # d/dw (μ/2)‖w - w_t‖² = μ(w - w_t)
                g + self.mu * (w - a)
                for g, w, a in zip(gradients, weights, self.anchors, strict=True)
            ]
            self.optimizer.apply(gradients, weights)
            for metric in self.metrics:
                if metric.name == "loss":  # the data loss, weighted by batch size as Keras does
                    metric.update_state(loss, sample_weight=tf.shape(x)[0])
            return self.compute_metrics(x, y, y_pred)

    return Proximal
