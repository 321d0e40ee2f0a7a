"""Keras model builders, and their weight layout for code that has no TensorFlow.

Tensors are named `<layer>/<variable>` (Keras 3's variable path), e.g.
`hidden1/kernel`. The aggregator image has no TensorFlow, so `SHAPES` states each
model's layout in plain Python; a test checks it against the built models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedsim.protocol.tasks import DEFAULT_MOMENTUM
from fedsim.settings_table import OPTIMIZERS

if TYPE_CHECKING:
    import keras

# Batches Keras takes per call of a compiled function. Scoring (evaluate, over a
# tf.data pipeline) runs them in one call; training (client/training.fit, batches fed
# from Python) runs a compiled step per batch either way. Under Keras' fit, one a call
# cost the mlp 2.7 ms a step of 10 images against 1.6 ms with 16; the steps, their
# order and the weights they give are the same.
STEPS_PER_EXECUTION = 16

# name -> ordered (tensor name, shape); every tensor is float32.
SHAPES: dict[str, tuple[tuple[str, tuple[int, ...]], ...]] = {
    # The original 784-200-200-10 ReLU network: 199,210 parameters.
    "mlp": (
        ("hidden1/kernel", (784, 200)),
        ("hidden1/bias", (200,)),
        ("hidden2/kernel", (200, 200)),
        ("hidden2/bias", (200,)),
        ("output/kernel", (200, 10)),
        ("output/bias", (10,)),
    ),
    # McMahan et al. 2017 (arXiv:1602.05629), "CNN": 1,663,370 parameters.
    "cnn": (
        ("conv1/kernel", (5, 5, 1, 32)),
        ("conv1/bias", (32,)),
        ("conv2/kernel", (5, 5, 32, 64)),
        ("conv2/bias", (64,)),
        ("hidden/kernel", (3136, 512)),
        ("hidden/bias", (512,)),
        ("output/kernel", (512, 10)),
        ("output/bias", (10,)),
    ),
}


def parameter_count(name: str) -> int:
    return sum(int(np.prod(shape)) for _, shape in SHAPES[name])


def initial_weights(name: str, seed: int) -> dict[str, np.ndarray]:
    """Seeded initial weights without TensorFlow: Glorot-uniform kernels, zero biases.

    Glorot and Bengio 2010: each kernel entry is uniform in [-l, l] with
    l = sqrt(6 / (fan_in + fan_out)); a dense kernel (in, out) has fan_in = in and
    fan_out = out, a conv kernel (kh, kw, cin, cout) fan_in = kh kw cin and
    fan_out = kh kw cout, as Keras' GlorotUniform. Tensor i draws from
    default_rng([seed, i]), so the weights depend only on `seed`.
    """
    if name not in SHAPES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(SHAPES)}")
    tensors: dict[str, np.ndarray] = {}
    for i, (tensor, shape) in enumerate(SHAPES[name]):
        if tensor.endswith("/bias"):
            tensors[tensor] = np.zeros(shape, np.float32)
            continue
        receptive = int(np.prod(shape[:-2]))  # kh * kw for a conv kernel, 1 for a dense one
        limit = np.sqrt(6 / (receptive * (shape[-2] + shape[-1])))
        rng = np.random.default_rng([seed, i])
        tensors[tensor] = rng.uniform(-limit, limit, shape).astype(np.float32)
    return tensors


def build(
    name: str,
    *,
    seed: int,
    learning_rate: float,
    optimizer: str = "sgd",
    momentum: float = DEFAULT_MOMENTUM,
) -> keras.Model:
    """A compiled model whose initial weights depend only on `seed`; `momentum` is sgd's."""
    import keras
    from keras import layers

    # Each initializer gets its own seed so the weights repeat exactly per SEED.
    def init(offset: int) -> keras.initializers.Initializer:
        return keras.initializers.GlorotUniform(seed=seed + offset)

    if name == "mlp":
        model = keras.Sequential(
            [
                keras.Input((28, 28)),
                layers.Flatten(name="flatten"),
                layers.Dense(200, activation="relu", kernel_initializer=init(1), name="hidden1"),
                layers.Dense(200, activation="relu", kernel_initializer=init(2), name="hidden2"),
                layers.Dense(10, activation="softmax", kernel_initializer=init(3), name="output"),
            ],
            name="mlp",
        )
    elif name == "cnn":
        model = keras.Sequential(
            [
                keras.Input((28, 28)),
                layers.Reshape((28, 28, 1), name="reshape"),
                layers.Conv2D(
                    32,
                    5,
                    padding="same",
                    activation="relu",
                    kernel_initializer=init(1),
                    name="conv1",
                ),
                layers.MaxPooling2D(2, name="pool1"),
                layers.Conv2D(
                    64,
                    5,
                    padding="same",
                    activation="relu",
                    kernel_initializer=init(2),
                    name="conv2",
                ),
                layers.MaxPooling2D(2, name="pool2"),
                layers.Flatten(name="flatten"),
                layers.Dense(512, activation="relu", kernel_initializer=init(3), name="hidden"),
                layers.Dense(10, activation="softmax", kernel_initializer=init(4), name="output"),
            ],
            name="cnn",
        )
    else:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(SHAPES)}")
    if optimizer == "sgd":
        opt = keras.optimizers.SGD(learning_rate, momentum=momentum)
    elif optimizer == "adam":
        opt = keras.optimizers.Adam(learning_rate)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    model.compile(
        optimizer=opt,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=STEPS_PER_EXECUTION,
    )
    return model


def _name(variable: keras.Variable) -> str:
    # Keras' path is "<model>/<layer>/<variable>"; the model name is not part of the layout.
    return variable.path.split("/", 1)[1]


def get_weights(model: keras.Model) -> dict[str, np.ndarray]:
    return {_name(w): np.asarray(w.numpy(), dtype=np.float32) for w in model.weights}


def set_weights(model: keras.Model, tensors: dict[str, np.ndarray]) -> None:
    for w in model.weights:
        w.assign(tensors[_name(w)])
