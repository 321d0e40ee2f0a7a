"""Keras models: the layouts the aggregator relies on, and seeded initial weights."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim import models


@pytest.mark.parametrize(("name", "params"), [("mlp", 199_210), ("cnn", 1_663_370)])
def test_built_model_matches_its_layout(name: str, params: int) -> None:
    model = models.build(name, seed=1, learning_rate=0.001)
    assert model.count_params() == params == models.parameter_count(name)
    built = models.get_weights(model)
    assert [(k, v.shape) for k, v in built.items()] == list(models.SHAPES[name])
    assert all(v.dtype == np.float32 for v in built.values())


def test_same_seed_same_initial_weights_other_seed_differs() -> None:
    a = models.get_weights(models.build("mlp", seed=7, learning_rate=0.001))
    b = models.get_weights(models.build("mlp", seed=7, learning_rate=0.001))
    c = models.get_weights(models.build("mlp", seed=8, learning_rate=0.001))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["hidden1/kernel"], c["hidden1/kernel"])


def test_set_weights_round_trip() -> None:
    model = models.build("mlp", seed=1, learning_rate=0.001)
    ones = {k: np.ones_like(v) for k, v in models.get_weights(model).items()}
    models.set_weights(model, ones)
    assert all((v == 1).all() for v in models.get_weights(model).values())


def test_unknown_model() -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        models.build("vgg", seed=1, learning_rate=0.001)


@pytest.mark.parametrize(("optimizer", "cls"), [("sgd", "SGD"), ("adam", "Adam")])
def test_optimizer_setting(make_settings, optimizer: str, cls: str) -> None:
    s = make_settings(OPTIMIZER=optimizer, LEARNING_RATE="0.01")
    model = models.build(s.model, seed=s.seed, learning_rate=s.learning_rate, optimizer=s.optimizer)
    assert type(model.optimizer).__name__ == cls
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(0.01)


def test_unknown_optimizer() -> None:
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        models.build("mlp", seed=1, learning_rate=0.001, optimizer="rmsprop")


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_initial_weights_without_tensorflow(name: str) -> None:
    """Glorot-uniform kernels (limit sqrt(6 / (fan_in + fan_out))), zero biases, per seed."""
    tensors = models.initial_weights(name, seed=7)
    assert [(k, v.shape) for k, v in tensors.items()] == list(models.SHAPES[name])
    for tensor, value in tensors.items():
        assert value.dtype == np.float32
        if tensor.endswith("/bias"):
            assert not value.any()
            continue
        *window, fan_in, fan_out = value.shape
        receptive = int(np.prod(window))  # conv: kh * kw
        limit = np.sqrt(6 / (receptive * fan_in + receptive * fan_out))
        assert np.abs(value).max() <= limit
        assert np.abs(value).max() > 0.95 * limit  # fills the whole interval
        assert value.std() == pytest.approx(limit / np.sqrt(3), rel=0.1)  # uniform's std
    again = models.initial_weights(name, seed=7)
    other = models.initial_weights(name, seed=8)
    for tensor in tensors:
        np.testing.assert_array_equal(tensors[tensor], again[tensor])
    kernel = models.SHAPES[name][0][0]
    assert not np.array_equal(tensors[kernel], other[kernel])
    # distinct tensors of one shape draw distinct values
    if name == "mlp":
        assert not np.array_equal(
            tensors["hidden2/kernel"][:10, :10], tensors["hidden1/kernel"][:10, :10]
        )


def test_initial_weights_load_into_the_keras_model() -> None:
    model = models.build("cnn", seed=1, learning_rate=0.001)
    tensors = models.initial_weights("cnn", seed=1)
    models.set_weights(model, tensors)
    for tensor, value in models.get_weights(model).items():
        np.testing.assert_array_equal(value, tensors[tensor])


def test_initial_weights_unknown_model() -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        models.initial_weights("vgg", seed=1)
