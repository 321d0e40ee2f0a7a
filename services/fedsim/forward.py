"""The models' forward pass in numpy: predictions without starting TensorFlow.

`scripts/evaluate.sh` scores one checkpoint once; TensorFlow's start-up (seconds)
would be most of its time. These functions compute what `models.build`'s Keras
models compute, layer for layer, from the same tensors (`models.SHAPES`), in
float32; `tests/test_forward.py` holds them to Keras' own predictions.

- mlp: softmax(relu(relu(x W1 + b1) W2 + b2) W3 + b3), x the 784 pixels in [0, 1].
- cnn: two 5x5 convolutions with "same" padding, each followed by ReLU and a 2x2
  max pooling, then dense 3136 -> 512 (ReLU) -> 10 (softmax); channels last, so
  the flattened order is (row, column, channel), as Keras' Flatten.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from fedsim.data import mnist
from fedsim.models import SHAPES

# Images a step: the cnn's second convolution unfolds 14 x 14 x 800 floats an image
# (627 kB), 63 MB for 100; larger batches were slower here (cache), smaller too (calls).
BATCH = 100


def predict(name: str, tensors: Mapping[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    """Class probabilities (n, 10), float32, of model `name` for uint8 `images` (n, 28, 28)."""
    if name not in SHAPES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(SHAPES)}")
    layers = _cnn if name == "cnn" else _mlp
    t = {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}
    out = [layers(t, images[i : i + BATCH]) for i in range(0, len(images), BATCH)]
    return np.concatenate(out) if out else np.zeros((0, 10), np.float32)


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, np.float32(0.0))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _dense(x: np.ndarray, t: Mapping[str, np.ndarray], layer: str) -> np.ndarray:
    return x @ t[f"{layer}/kernel"] + t[f"{layer}/bias"]


def _conv_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """x (n, h, w, c) convolved with kernel (kh, kw, c, out), stride 1, zero "same" padding."""
    n, h, w, c = x.shape
    kh, kw = kernel.shape[:2]
    # TensorFlow's "same": (k - 1) // 2 zeros before, the rest after.
    padded = np.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
    # Each output pixel's window as a row in the kernel's (kh, kw, c) order, channels
    # innermost so the copy moves runs of c floats: one matrix product does the rest.
    windows = sliding_window_view(padded, (kh, kw), axis=(1, 2)).transpose(0, 1, 2, 4, 5, 3)
    rows = windows.reshape(n * h * w, kh * kw * c)
    return (rows @ kernel.reshape(kh * kw * c, -1)).reshape(n, h, w, -1) + bias


def _pool(x: np.ndarray) -> np.ndarray:
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _mlp(t: Mapping[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    x = mnist.scale(images).reshape(len(images), -1)
    x = _relu(_dense(x, t, "hidden1"))
    x = _relu(_dense(x, t, "hidden2"))
    return _softmax(_dense(x, t, "output"))


def _cnn(t: Mapping[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    x = mnist.scale(images)[..., np.newaxis]
    x = _pool(_relu(_conv_same(x, t["conv1/kernel"], t["conv1/bias"])))
    x = _pool(_relu(_conv_same(x, t["conv2/kernel"], t["conv2/bias"])))
    x = _relu(_dense(x.reshape(len(x), -1), t, "hidden"))
    return _softmax(_dense(x, t, "output"))
