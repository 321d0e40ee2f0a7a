"""A worker's Trainer on real MNIST and TensorFlow: virtual clients, fresh optimizers, scoring."""

from __future__ import annotations

import ctypes
import gc
from dataclasses import replace

import numpy as np
import pytest

from fedsim import models, tfruntime
from fedsim.data import partition
from fedsim.protocol import TrainSettings
from fedsim.protocol.tasks import DEFAULT_MOMENTUM

SETTINGS = TrainSettings(epochs=1, batch_size=50, learning_rate=0.05, optimizer="sgd")


def rss_mb() -> float:
    """This process's resident memory now, in MB (Linux), after a collection.

    glibc's malloc_trim first hands freed pages back, so a reading is not lowered
    now and then by the allocator shrinking its pools on its own.
    """
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


@pytest.fixture(scope="module")
def trainer(mnist_dir):
    tfruntime.configure(2)
    from fedsim.client.training import Trainer

    return Trainer(mnist_dir, verify=True, model="mlp", seed=42)


@pytest.mark.parametrize("mu", [0, 0.01], ids=["plain", "fedprox"])
def test_one_worker_trains_twenty_clients_in_constant_memory(trainer, mu):
    """Plain training, then FedProx's: neither builds or traces anything per task."""
    plan = {"PARTITION": "iid", "SEED": 42, "NUM_CLIENTS": 100}
    parts = partition.make(plan, trainer.labels)
    tensors = models.initial_weights("mlp", 42)
    after = []
    for i, part in enumerate(parts[:20]):
        settings = replace(SETTINGS, proximal_mu=mu)
        tensors, trained = trainer.train(tensors, part.indices, settings, seed=i)
        assert trained.samples == 600 and np.isfinite(trained.loss)
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


@pytest.mark.parametrize("proximal", [False, True], ids=["plain", "fedprox-mu-0"])
def test_fit_takes_keras_fits_steps_and_reports_its_last_epoch(trainer, proximal):
    """training.fit in order against Keras' own fit(shuffle=False): two epochs of 26
    batches of 10 (the last of 5), so two calls of the compiled step a epoch, the second
    short: the same weights and the same last epoch's loss and accuracy."""
    from fedsim.client.training import fit, fresh_optimizer, proximal_model

    inner = models.build("mlp", seed=0, learning_rate=0.05)  # momentum SGD, as the workers'
    model = proximal_model(inner) if proximal else inner
    start = models.initial_weights("mlp", 4)
    x, y = images(trainer, np.arange(255))
    got = []
    for run in ("keras", "ours", "ours again"):
        models.set_weights(inner, start)
        fresh_optimizer(inner.optimizer, 0.05)
        if proximal:
            model.start(0.0)
        if run == "keras":
            history = model.fit(x, y, epochs=2, batch_size=10, shuffle=False, verbose=0)
            reported = history.history["loss"][-1], history.history["accuracy"][-1]
        else:
            reported = fit(model, x, y, 2, 10, None)
        got.append((models.get_weights(inner), reported))
    for name in start:
        np.testing.assert_allclose(got[1][0][name], got[0][0][name], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got[1][0][name], got[2][0][name], err_msg=name)
        assert not np.allclose(got[1][0][name], start[name]), name  # it did train
    assert got[1][1] == pytest.approx(got[0][1], rel=1e-5)


def test_fit_shuffles_each_epoch_from_the_generator_it_is_given(trainer):
    from fedsim.client.training import fit, fresh_optimizer

    model = models.build("mlp", seed=0, learning_rate=0.05)
    start = models.initial_weights("mlp", 4)
    x, y = images(trainer, np.arange(200))
    got = {}
    for run, shuffle in [("in order", None), ("seed 1", 1), ("seed 1 again", 1), ("seed 2", 2)]:
        models.set_weights(model, start)
        fresh_optimizer(model.optimizer, 0.05)
        fit(model, x, y, 2, 20, None if shuffle is None else np.random.default_rng(shuffle))
        got[run] = models.get_weights(model)["output/bias"]
    np.testing.assert_array_equal(got["seed 1"], got["seed 1 again"])
    assert not np.allclose(got["seed 1"], got["in order"])
    assert not np.allclose(got["seed 1"], got["seed 2"])
    with pytest.raises(ValueError, match="at least one image"):
        fit(model, x[:0], y[:0], 1, 20, None)


def test_evaluate_scores_an_untrained_model_near_chance(trainer):
    accuracy, loss, seconds = trainer.evaluate(models.initial_weights("mlp", 1))
    assert 0.0 < accuracy < 0.3 and loss > 1.5 and seconds >= 0


# --- FedProx's proximal term ------------------------------------------------------


@pytest.fixture(scope="module")
def probe(trainer):
    """A second model for computing data gradients and losses by hand."""
    return models.build("mlp", seed=0, learning_rate=0.1)


def data_gradient(model, tensors, x, y):
    """F(w) and ∇F(w), the mean cross-entropy alone, at `tensors`, by GradientTape."""
    import keras
    import tensorflow as tf

    models.set_weights(model, tensors)
    with tf.GradientTape() as tape:
        loss = keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, model(x)))
    gradients = tape.gradient(loss, model.trainable_weights)
    # The mlp's weights are all trainable, so get_weights names them in the same order.
    return float(loss), {
        name: g.numpy() for name, g in zip(models.get_weights(model), gradients, strict=True)
    }


def images(trainer, indices):
    from fedsim.data import mnist

    return mnist.scale(trainer.images[indices]), trainer.labels[indices].astype(np.int64)


def distance(a, b):
    return float(np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in a)))


def test_one_proximal_step_is_minus_the_rate_times_data_plus_mu_gradient(trainer, probe):
    """Plain SGD, one full batch: w' = w - η(∇F(w) + μ(w - w_t)) with w ≠ w_t."""
    import keras

    from fedsim.client.training import proximal_model

    eta, mu = 0.1, 0.5
    inner = models.build("mlp", seed=0, learning_rate=eta)
    inner.compile(
        optimizer=keras.optimizers.SGD(eta),  # no momentum: one step is exactly -η g
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model = proximal_model(inner)
    w_t, w = models.initial_weights("mlp", 1), models.initial_weights("mlp", 2)
    rng = np.random.default_rng(0)
    for name in ("hidden1/bias", "hidden2/bias", "output/bias"):  # biases away from w_t's zeros
        w[name] += rng.normal(0, 0.1, w[name].shape).astype(np.float32)
    x, y = images(trainer, np.arange(64))
    models.set_weights(inner, w_t)
    model.start(mu)  # w_t held
    models.set_weights(inner, w)
    model.fit(x, y, epochs=1, batch_size=len(x), shuffle=False, verbose=0)
    after = models.get_weights(inner)

    _, grad = data_gradient(probe, w, x, y)
    for name in w:
        expected = w[name] - eta * (grad[name] + mu * (w[name] - w_t[name]))
        plain = w[name] - eta * grad[name]
        np.testing.assert_allclose(after[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)
        # The proximal term did move every tensor: the test would see it missing.
        assert np.abs(expected - plain).max() > 1e-4, name


def test_proximal_step_with_mu_zero_takes_the_plain_steps_bit_for_bit(trainer):
    import keras

    from fedsim.client.training import fresh_optimizer, proximal_model

    inner = models.build("mlp", seed=0, learning_rate=0.05)  # momentum SGD, as the workers'
    model = proximal_model(inner)
    start = models.initial_weights("mlp", 3)
    x, y = images(trainer, np.arange(600))
    results = []
    for fitted in (inner, model, inner):
        models.set_weights(inner, start)
        fresh_optimizer(inner.optimizer, 0.05)
        model.start(0.0)
        keras.utils.set_random_seed(11)
        history = fitted.fit(x, y, epochs=1, batch_size=10, shuffle=True, verbose=0)
        results.append((models.get_weights(inner), history.history))
    for name in start:
        np.testing.assert_array_equal(results[0][0][name], results[1][0][name], err_msg=name)
        np.testing.assert_array_equal(results[0][0][name], results[2][0][name], err_msg=name)
    assert results[0][1] == results[1][1]  # the same loss and accuracy reported


def test_trainer_anchors_each_task_at_its_own_start_with_momentum(trainer, probe):
    """Two full-batch steps of momentum SGD (β = 0.9), by hand:
    w1 = w0 - η ∇F(w0);  w2 = w1 + β(-η ∇F(w0)) - η(∇F(w1) + μ(w1 - w0)).
    The reported loss is the data loss F(w1) of the last epoch, without the term."""
    eta, mu, beta = 0.1, 0.5, DEFAULT_MOMENTUM
    settings = replace(SETTINGS, learning_rate=eta, proximal_mu=mu, epochs=2, batch_size=64)
    indices = np.arange(5000, 5064)
    w0 = models.initial_weights("mlp", 5)
    # Another task first, from other weights: its anchor must not stay behind.
    trainer.train(models.initial_weights("mlp", 6), np.arange(64), settings, seed=1)
    after, trained = trainer.train(w0, indices, settings, seed=2)

    x, y = images(trainer, indices)
    _, g0 = data_gradient(probe, w0, x, y)
    w1 = {k: w0[k] - eta * g0[k] for k in w0}
    loss1, g1 = data_gradient(probe, w1, x, y)
    for name in w0:
        expected = w1[name] - beta * eta * g0[name] - eta * (g1[name] + mu * (w1[name] - w0[name]))
        np.testing.assert_allclose(after[name], expected, rtol=1e-4, atol=2e-6, err_msg=name)
    term = mu / 2 * distance(w1, w0) ** 2
    assert term > 1e-3  # large enough to tell the data loss from the objective
    assert trained.loss == pytest.approx(loss1, rel=1e-5)


def test_momentum_zero_is_plain_sgd_and_each_momentum_its_own_model(trainer, probe):
    """MOMENTUM=0, two full-batch steps: w1 = w0 - η∇F(w0), w2 = w1 - η∇F(w1). The same
    trainer then trains with β = 0.9: its own compiled model, β η ∇F(w0) further."""
    eta = 0.1
    settings = replace(SETTINGS, learning_rate=eta, momentum=0.0, epochs=2, batch_size=64)
    indices = np.arange(5000, 5064)
    w0 = models.initial_weights("mlp", 5)
    plain, _ = trainer.train(w0, indices, settings, seed=2)
    heavy, _ = trainer.train(w0, indices, replace(settings, momentum=DEFAULT_MOMENTUM), seed=2)

    x, y = images(trainer, indices)
    _, g0 = data_gradient(probe, w0, x, y)
    w1 = {k: w0[k] - eta * g0[k] for k in w0}
    _, g1 = data_gradient(probe, w1, x, y)
    for name in w0:
        expected = w1[name] - eta * g1[name]
        np.testing.assert_allclose(plain[name], expected, rtol=1e-4, atol=2e-6, err_msg=name)
        np.testing.assert_allclose(
            heavy[name], expected - DEFAULT_MOMENTUM * eta * g0[name], rtol=1e-4, atol=2e-6
        )


def test_a_large_mu_keeps_the_weights_near_the_start(trainer):
    start = models.initial_weights("mlp", 8)
    indices = np.arange(2000, 2600)
    free, _ = trainer.train(start, indices, SETTINGS, seed=9)
    again, _ = trainer.train(start, indices, replace(SETTINGS, proximal_mu=0.0), seed=9)
    held, trained = trainer.train(start, indices, replace(SETTINGS, proximal_mu=10.0), seed=9)
    for name in start:
        np.testing.assert_array_equal(free[name], again[name])  # μ = 0 is plain training
    print(f"‖w - w_t‖: μ=0 {distance(free, start):.3f}, μ=10 {distance(held, start):.3f}")
    assert distance(held, start) < 0.5 * distance(free, start)
    assert np.isfinite(trained.loss) and trained.samples == 600


@pytest.mark.parametrize("mu", [-0.1, float("nan"), float("inf"), "much", "0.01", [1], True])
def test_a_bad_proximal_mu_is_refused_in_one_line(trainer, mu):
    with pytest.raises(ValueError, match=r"^proximal_mu must be a finite number >= 0, got "):
        trainer.train(
            models.initial_weights("mlp", 1),
            np.arange(10),
            {**SETTINGS.to_json(), "proximal_mu": mu},
            0,
        )


# --- labels in place of the data set's ----------------------------------------------


def test_train_uses_the_labels_it_is_given_for_the_indices(trainer):
    start, indices = models.initial_weights("mlp", 4), np.arange(300, 400)
    own, _ = trainer.train(start, indices, SETTINGS, seed=1)
    same, _ = trainer.train(start, indices, SETTINGS, seed=1, labels=trainer.labels[indices])
    other, _ = trainer.train(
        start, indices, SETTINGS, seed=1, labels=(trainer.labels[indices] + 1) % 10
    )
    np.testing.assert_array_equal(own["output/bias"], same["output/bias"])
    assert not np.allclose(own["output/bias"], other["output/bias"])


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.zeros(9, np.int64), r"^labels must be one per index: shape \(9,\), 10 indices$"),
        (np.arange(1, 11), r"^labels must be integers 0-9, got values 1\.\.10$"),
        (np.full(10, -1), r"^labels must be integers 0-9, got values -1\.\.-1$"),
        (np.zeros(10, np.float32), r"^labels must be integers 0-9, got dtype float32$"),
    ],
)
def test_bad_labels_are_refused_in_one_line(trainer, labels, message):
    with pytest.raises(ValueError, match=message):
        trainer.train(models.initial_weights("mlp", 1), np.arange(10), SETTINGS, 0, labels=labels)


def test_a_worker_process_imports_tensorflow_without_pyplot() -> None:
    """Keras imports matplotlib.pyplot when it can, which builds a font cache in a fresh
    container; a worker draws nothing, so its start keeps pyplot out. Without the guard the
    same import loads it (so the check below can fail)."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from fedsim import tfruntime\n"
        "{guard}"
        "tfruntime.import_tensorflow()\n"
        "import keras\n"
        "print('matplotlib.pyplot' in sys.modules and sys.modules['matplotlib.pyplot'] is not None)\n"
    )
    outputs = []
    for guard in ("tfruntime.keep_pyplot_out()\n", ""):
        done = subprocess.run(
            [sys.executable, "-c", probe.format(guard=guard)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        outputs.append(done.stdout.strip().splitlines()[-1])
    assert outputs == ["False", "True"]
