"""The numpy forward pass (evaluate's) against Keras' own predictions of the same weights."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim import forward, models


def _trained_looking(name: str, seed: int) -> dict[str, np.ndarray]:
    """Seeded initial weights with non-zero biases, so every term of each layer counts."""
    rng = np.random.default_rng(seed)
    return {
        k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32)
        for k, v in models.initial_weights(name, seed).items()
    }


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_forward_agrees_with_keras(name: str) -> None:
    tensors = _trained_looking(name, 3)
    rng = np.random.default_rng(4)
    # More images than a batch, not a multiple of it: the batches' seams are covered too.
    images = rng.integers(0, 256, (forward.BATCH + 37, 28, 28), dtype=np.uint8)
    model = models.build(name, seed=1, learning_rate=0.01)
    models.set_weights(model, tensors)
    expected = model.predict(images.astype(np.float32) / 255.0, batch_size=100, verbose=0)
    got = forward.predict(name, tensors, images)
    assert got.shape == (len(images), 10) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).mean() > 0.99
    # Not a constant answer: the weights make the classes differ.
    assert len(set(got.argmax(axis=1))) > 1


def test_forward_by_hand() -> None:
    # An mlp whose layers copy pixel 0 through to class 0's logit: p0 = e^x / (e^x + 9).
    tensors = {k: np.zeros(s, np.float32) for k, s in models.SHAPES["mlp"]}
    tensors["hidden1/kernel"][0, 0] = 1.0
    tensors["hidden2/kernel"][0, 0] = 1.0
    tensors["output/kernel"][0, 0] = 1.0
    images = np.zeros((2, 28, 28), np.uint8)
    images[1, 0, 0] = 255
    got = forward.predict("mlp", tensors, images)
    np.testing.assert_allclose(got[0], np.full(10, 0.1), rtol=1e-6)
    assert got[1, 0] == pytest.approx(np.e / (np.e + 9), rel=1e-6)


def test_forward_of_no_images_and_of_an_unknown_model() -> None:
    tensors = models.initial_weights("mlp", 1)
    assert forward.predict("mlp", tensors, np.zeros((0, 28, 28), np.uint8)).shape == (0, 10)
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        forward.predict("vgg", tensors, np.zeros((1, 28, 28), np.uint8))


def test_a_workers_score_is_evaluates_score(mnist_dir) -> None:
    # The worker scores with Keras on the test set's uint8 batches, evaluate.sh with numpy
    # on the same images: the same weights get the same accuracy and loss from both.
    from fedsim import evaluate, tfruntime
    from fedsim.client.training import Trainer
    from fedsim.data import mnist

    tfruntime.configure(1)
    trainer = Trainer(mnist_dir, verify=False, model="mlp", seed=1)
    tensors = _trained_looking("mlp", 5)
    accuracy, loss, _ = trainer.evaluate(tensors)
    images, labels = mnist.load_pair(mnist_dir, "t10k", verify=False)
    scored = evaluate.score(forward.predict("mlp", tensors, images), labels.astype(np.int64))
    assert 0.05 < accuracy < 0.95  # neither constant nor trivial: the comparison means something
    assert abs(scored["accuracy"] - accuracy) <= 0.0002  # at most 2 of 10,000 at a tie
    assert scored["loss"] == pytest.approx(loss, rel=1e-4)
