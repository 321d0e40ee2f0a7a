"""Local training: one Keras model per process, trained on one slice at a time.

`configure_tensorflow` must run before TensorFlow is first imported: thread pools
and the C++ log level are fixed when its runtime starts.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from fedsim import models
from fedsim.config import Settings
from fedsim.data import mnist


def threads_for(settings: Settings, cpu_count: int | None = None) -> int:
    """Intra-op threads: TF_THREADS, or with 0 the cores shared among the clients."""
    if settings.tf_threads:
        return settings.tf_threads
    # Every client on one machine would otherwise claim all cores and they would
    # fight over them; one share each keeps the machine busy without thrashing.
    return max(1, (cpu_count or os.cpu_count() or 1) // len(settings.client_slices))


def quiet_tensorflow() -> None:
    """Keep TensorFlow's C++ info lines out of the logs; call before importing it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # oneDNN announces itself on stderr before any log level applies; for these
    # small models it is no faster here (5 epochs of 5,000 images: 1.4 s either
    # way), and without it results repeat bit for bit.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def configure_tensorflow(intra_op: int) -> None:
    """Quiet TensorFlow and size its thread pools; call before importing it."""
    quiet_tensorflow()
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    tf.config.threading.set_inter_op_parallelism_threads(1)  # one small graph at a time


@dataclass(frozen=True)
class Trained:
    slice: int
    samples: int
    loss: float
    accuracy: float
    seconds: float


class Trainer:
    """Holds the model (built once) and this client's images, already scaled."""

    def __init__(self, settings: Settings, first: int, last: int, *, seed_offset: int = 0) -> None:
        import keras

        self.settings = settings
        # Seeds Keras' shuffling (and any dropout) so a rerun repeats; the offset
        # gives each client its own order.
        keras.utils.set_random_seed(settings.seed + seed_offset)
        images, labels = mnist.load_pair(settings.data_dir, "train", verify=settings.data_verify)
        start = mnist.slice_range(first, settings.num_images_train)[0]
        stop = mnist.slice_range(last, settings.num_images_train)[1]
        self.first = first
        self.images = mnist.scale(images[start:stop])
        self.labels = np.asarray(labels[start:stop], dtype=np.int64)
        self.model = models.from_settings(settings)

    def get_weights(self) -> dict[str, np.ndarray]:
        return models.get_weights(self.model)

    def set_weights(self, tensors: dict[str, np.ndarray]) -> None:
        models.set_weights(self.model, tensors)

    def train(self, slice_no: int) -> Trained:
        size = self.settings.num_images_train
        lo = (slice_no - self.first) * size
        x, y = self.images[lo : lo + size], self.labels[lo : lo + size]
        started = time.monotonic()
        history = self.model.fit(
            x,
            y,
            epochs=self.settings.epochs,
            batch_size=self.settings.batch_size,
            shuffle=True,
            verbose=0,
        )
        return Trained(
            slice_no,
            len(x),
            float(history.history["loss"][-1]),
            float(history.history["accuracy"][-1]),
            time.monotonic() - started,
        )
