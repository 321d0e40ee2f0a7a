"""The attack stage: by hand on tiny arrays, and label-flip trained on real MNIST."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim import models, tfruntime
from fedsim.pipeline import attacks


def tensors(**arrays: list) -> dict[str, np.ndarray]:
    return {name: np.asarray(values, np.float32) for name, values in arrays.items()}


# --- label-flip -----------------------------------------------------------------------


def test_flip_labels_maps_each_digit_to_nine_minus_it():
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3], np.uint8)
    flipped = attacks.flip_labels(labels)
    assert flipped.tolist() == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 6]
    assert flipped.dtype == np.uint8
    assert not np.any(flipped == labels)  # no digit keeps its label
    np.testing.assert_array_equal(attacks.flip_labels(flipped), labels)  # its own inverse
    assert labels.tolist()[0] == 0  # the input is left alone


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array([0.0, 1.0]), r"^labels must be integers 0-9, got dtype float64$"),
        (np.array([3, 10]), r"^labels must be integers 0-9, got values 3\.\.10$"),
        (np.array([-1, 2]), r"^labels must be integers 0-9, got values -1\.\.2$"),
    ],
)
def test_flip_labels_refuses_what_is_not_a_digit(labels, message):
    with pytest.raises(ValueError, match=message):
        attacks.flip_labels(labels)


def test_labels_for_flips_only_for_label_flip():
    labels = np.array([1, 7, 0])
    assert attacks.labels_for({"kind": "label-flip", "seed": 1}, labels).tolist() == [8, 2, 9]
    for attack in (None, {"kind": "scaled", "scale": 5.0}, {"kind": "noise", "seed": 1}):
        assert attacks.labels_for(attack, labels).tolist() == [1, 7, 0]


# --- scaled ---------------------------------------------------------------------------


def test_scaled_is_the_base_plus_lambda_times_the_update():
    base = tensors(a=[1.0, 2.0], b=[[0.5]])
    trained = tensors(a=[2.0, 0.0], b=[[0.25]])
    out = attacks.scaled(base, trained, 3.0)
    # a: 1 + 3(2 - 1) = 4, 2 + 3(0 - 2) = -4;  b: 0.5 + 3(0.25 - 0.5) = -0.25
    assert out["a"].tolist() == [4.0, -4.0] and out["b"].tolist() == [[-0.25]]
    assert all(t.dtype == np.float32 for t in out.values())
    assert attacks.scaled(base, trained, -1.0)["a"].tolist() == [0.0, 4.0]  # the update reversed
    assert attacks.scaled(base, trained, 0)["a"].tolist() == [1.0, 2.0]  # the base itself


def test_scaled_with_lambda_one_is_the_identity():
    rng = np.random.default_rng(3)
    base = {"k": rng.normal(size=(30, 20)).astype(np.float32), "b": np.zeros(20, np.float32)}
    trained = {k: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for k, v in base.items()}
    out = attacks.scaled(base, trained, 1.0)
    for name in base:
        np.testing.assert_array_equal(out[name], trained[name])


@pytest.mark.parametrize(
    ("scale", "message"),
    [
        (float("nan"), r"^attack scale must be a finite number, got nan$"),
        (float("inf"), r"^attack scale must be a finite number, got inf$"),
        ("10", r"^attack scale must be a finite number, got '10'$"),
        (True, r"^attack scale must be a finite number, got True$"),
        (1e38, r"^scale 1e\+38 gives non-finite float32 values in a$"),
    ],
)
def test_scaled_refuses_a_bad_scale_in_one_line(scale, message):
    with pytest.raises(ValueError, match=message):
        attacks.scaled(tensors(a=[0.0]), tensors(a=[100.0]), scale)


def test_scaled_refuses_weights_of_another_layout():
    with pytest.raises(ValueError, match=r"^base and trained weights differ in tensors: \['c'\]$"):
        attacks.scaled(tensors(a=[1.0]), tensors(a=[1.0], c=[2.0]), 2.0)
    with pytest.raises(ValueError, match=r"^a: base shape \(1,\), trained shape \(2,\)$"):
        attacks.scaled(tensors(a=[1.0]), tensors(a=[1.0, 2.0]), 2.0)


# --- noise ----------------------------------------------------------------------------


def test_noise_has_each_tensors_std_and_repeats_with_its_seed():
    rng = np.random.default_rng(5)
    base = {
        "wide": rng.normal(0.3, 2.0, (400, 100)).astype(np.float32),  # std 2
        "narrow": rng.uniform(-0.01, 0.01, (300, 100)).astype(np.float32),  # std 0.01/√3
        "zero": np.zeros(50, np.float32),
    }
    out = attacks.noise(base, seed=11)
    assert list(out) == list(base) and all(t.dtype == np.float32 for t in out.values())
    for name in ("wide", "narrow"):
        assert out[name].shape == base[name].shape
        # 30,000+ draws: the sample std is within 2% of s, the mean within 5 s/√n of 0.
        assert out[name].std() == pytest.approx(base[name].std(), rel=0.02)
        assert abs(out[name].mean()) < 5 * base[name].std() / np.sqrt(out[name].size)
        assert abs(np.corrcoef(out[name].ravel(), base[name].ravel())[0, 1]) < 0.05
    assert not out["zero"].any()  # a constant tensor has no scale
    again = attacks.noise(dict(reversed(base.items())), seed=11)  # order does not matter
    other = attacks.noise(base, seed=12)
    for name in base:
        np.testing.assert_array_equal(out[name], again[name])
    assert not np.allclose(out["wide"], other["wide"])


@pytest.mark.parametrize("seed", [-1, 1.5, "7", None, True])
def test_noise_refuses_a_bad_seed_in_one_line(seed):
    with pytest.raises(ValueError, match=r"^attack seed must be an integer >= 0, got "):
        attacks.noise(tensors(a=[1.0, 2.0]), seed)


# --- the dispatcher the worker calls -----------------------------------------------


def test_apply_sends_what_each_attack_says():
    base = tensors(a=[1.0, 3.0])
    trained = tensors(a=[2.0, 2.0])
    assert attacks.apply(None, base, trained)["a"].tolist() == [2.0, 2.0]
    flip = {"kind": "label-flip", "scale": 1.0, "seed": 4}
    assert attacks.apply(flip, base, trained)["a"].tolist() == [2.0, 2.0]
    boosted = attacks.apply({"kind": "scaled", "scale": 10.0, "seed": 4}, base, trained)
    assert boosted["a"].tolist() == [11.0, -7.0]
    noisy = attacks.apply({"kind": "noise", "scale": 1.0, "seed": 4}, base, trained)
    np.testing.assert_array_equal(noisy["a"], attacks.noise(base, 4)["a"])
    assert noisy["a"].dtype == np.float32


@pytest.mark.parametrize(
    ("attack", "message"),
    [
        (
            {"kind": "backdoor"},
            r"^unknown attack kind 'backdoor'; known: label-flip, scaled, noise$",
        ),
        ({}, r"^unknown attack kind None; known: "),
        ("scaled", r"^an attack must be a mapping with a 'kind', got 'scaled'$"),
        ({"kind": "scaled"}, r"^a scaled attack needs a 'scale'$"),
        ({"kind": "noise"}, r"^a noise attack needs a 'seed'$"),
    ],
)
def test_apply_refuses_a_bad_attack_in_one_line(attack, message):
    with pytest.raises(ValueError, match=message):
        attacks.apply(attack, tensors(a=[1.0]), tensors(a=[2.0]))


def test_apply_refuses_non_finite_trained_weights():
    with pytest.raises(ValueError, match=r"^the trained weights gives non-finite"):
        attacks.apply(None, tensors(a=[1.0]), tensors(a=[float("nan")]))


# --- label-flip on real MNIST -------------------------------------------------------


def test_a_label_flipping_client_learns_the_wrong_digits(mnist_dir):
    tfruntime.configure(2)
    from fedsim.client.training import Trainer

    trainer = Trainer(mnist_dir, verify=True, model="mlp", seed=42)
    settings = {"epochs": 1, "batch_size": 50, "learning_rate": 0.05, "optimizer": "sgd"}
    start, indices = models.initial_weights("mlp", 42), np.arange(3000)
    attack = {"kind": "label-flip", "seed": 1}
    labels = attacks.labels_for(attack, trainer.labels[indices])
    flipped, _ = trainer.train(start, indices, settings, seed=1, labels=labels)
    flipped = attacks.apply(attack, start, flipped)
    honest, _ = trainer.train(start, indices, settings, seed=1)
    flipped_accuracy = trainer.evaluate(flipped)[0]
    honest_accuracy = trainer.evaluate(honest)[0]
    print(
        f"test accuracy on true labels: honest {honest_accuracy:.3f}, flipped {flipped_accuracy:.3f}"
    )
    assert honest_accuracy > 0.8
    assert flipped_accuracy < 0.1  # below chance: it predicts 9 - y where it has learnt
