"""Differential privacy's stages: clipping on the worker, the aggregator's re-check, the noise's
size, equal weights, and the settings DP refuses (pipeline/clip.py, pipeline/dp.py)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from fedsim import config, models, pipeline
from fedsim.pipeline import clip, dp
from fedsim.pipeline import noise as noise_math
from fedsim.pipeline.base import Outgoing

LAYOUT = models.SHAPES["mlp"]


def model(fill: float) -> dict[str, np.ndarray]:
    return {name: np.full(shape, fill, np.float32) for name, shape in LAYOUT}


def random_model(seed: int, scale: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (scale * rng.standard_normal(shape)).astype(np.float32) for name, shape in LAYOUT}


def dp_settings(make_settings, **overrides):
    base = {"AGGREGATION": "fedavg", "PARTITION": "iid", "NUM_CLIENTS": 10, "CLIENTS_PER_ROUND": 4}
    return make_settings(**{"DP": "central", **base, **overrides})


# --- clipping ----------------------------------------------------------------------------


def test_clipping_keeps_a_short_delta_and_brings_a_long_one_to_the_norm():
    short = {"a": np.array([0.3, 0.4])}  # norm 0.5
    long_ = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}  # norm 5 over both tensors
    kept, before_short = clip.clip(short, 1.0)
    clipped, before_long = clip.clip(long_, 1.0)
    assert before_short == pytest.approx(0.5) and before_long == pytest.approx(5.0)
    np.testing.assert_allclose(kept["a"], [0.3, 0.4])
    assert clip.norm(clipped) == pytest.approx(1.0)
    np.testing.assert_allclose(clipped["a"], [0.6, 0.0])  # the direction is kept
    np.testing.assert_allclose(clipped["b"], [[0.8]])


def test_the_worker_clips_its_delta_from_the_base_before_the_push(make_settings):
    stages = pipeline.build(dp_settings(make_settings, DP_CLIP=0.5))
    base, trained = random_model(1, 0.1), random_model(2, 0.1)
    assert clip.norm(clip.delta_of(trained, base)) > 10  # far over the norm before
    sent = stages.worker(Outgoing(base, trained, {"seed": 7}))
    assert all(t.dtype == np.float32 for t in sent.tensors.values())
    assert clip.norm(clip.delta_of(sent.tensors, base)) == pytest.approx(0.5, rel=1e-5)


def test_the_aggregator_clips_an_over_norm_update_from_a_worker_that_skipped_it(
    make_settings, caplog
):
    # Prepare: DP_CLIP_AT=worker, no noise; one honest (clipped) update, one raw update of
    # all 2.0 from a worker that skipped clipping.
    stage = dp.CentralNoise.from_settings(dp_settings(make_settings, DP_CLIP=1.0, DP_NOISE=0))
    base = model(0.0)
    honest = clip.clipped_weights(random_model(3, 0.01), base, 1.0)[0]
    raw = model(2.0)
    # Execute
    with caplog.at_level(logging.WARNING, "fedsim.pipeline"):
        alone = stage.gather([raw], base, 4)[0]
        both = stage.gather([honest, raw], base, 4)[0]
    # Assert: clipped to norm 1 (the mean of one update is that update), said once per round.
    assert clip.norm(clip.delta_of(alone, base)) == pytest.approx(1.0, rel=1e-6)
    unit = 1 / math.sqrt(sum(math.prod(shape) for _, shape in LAYOUT))
    expected = (clip.delta_of(honest, base)["output/bias"] + unit) / 2
    np.testing.assert_allclose(both["output/bias"], expected, rtol=1e-5)
    assert stage.over_norm == 2
    raw_norm = 2 / unit
    assert f"round 4: update 2 of 2 has norm {raw_norm:.4g} > DP_CLIP=1" in caplog.text
    assert "update 1 of 2" not in caplog.text and "its worker did not clip" in caplog.text


def test_with_dp_clip_at_aggregator_the_worker_sends_it_raw_and_the_aggregator_clips(
    make_settings, caplog
):
    settings = dp_settings(make_settings, DP_CLIP_AT="aggregator", DP_NOISE=0)
    stages = pipeline.build(settings)
    base, trained = model(0.0), model(2.0)
    sent = stages.worker(Outgoing(base, trained, {"seed": 1}))
    np.testing.assert_array_equal(sent.tensors["output/bias"], trained["output/bias"])
    with caplog.at_level(logging.WARNING, "fedsim.pipeline"):
        out = stages.gather([sent.tensors], base, 1)
    assert clip.norm(clip.delta_of(out[0], base)) == pytest.approx(1.0, rel=1e-6)
    assert caplog.text == ""  # clipping is the aggregator's job here, nothing to warn of


# --- the central noise, and equal weights ------------------------------------------------


def test_the_central_noise_has_std_z_times_clip_over_m_on_the_mean(make_settings):
    # Prepare: z = 1.5, S = 2, m = 4 updates of delta 0: the mean is the noise alone.
    settings = dp_settings(make_settings, DP_NOISE=1.5, DP_CLIP=2.0)
    stage = dp.CentralNoise.from_settings(settings)
    base = model(0.25)
    # Execute: 5 rounds, 199,210 draws each (fixed seed: the same draws every run).
    draws = np.concatenate(
        [
            np.concatenate(
                [
                    (t.astype(np.float64) - 0.25).ravel()
                    for t in stage.gather([base] * 4, base, r)[0].values()
                ]
            )
            for r in range(1, 6)
        ]
    )
    # Assert: z S / m = 0.75. The sample std of ~10^6 normal draws is within 0.4% of the
    # true one at 5 standard errors (1 / sqrt(2n) = 0.07%); the tolerance is 1%.
    assert draws.size == 5 * 199_210
    assert abs(draws.mean()) < 0.01
    assert draws.std() == pytest.approx(1.5 * 2.0 / 4, rel=0.01)


def test_the_noise_differs_by_round_and_repeats_for_the_same_round(make_settings):
    stage = dp.CentralNoise.from_settings(dp_settings(make_settings))
    base = model(0.0)
    one, again, two = (stage.gather([base], base, r)[0] for r in (1, 1, 2))
    np.testing.assert_array_equal(one["hidden1/kernel"], again["hidden1/kernel"])
    assert not np.array_equal(one["hidden1/kernel"], two["hidden1/kernel"])


def test_the_rule_sees_the_equal_weight_mean_whatever_the_sample_counts(make_settings):
    # Prepare: no noise; deltas 0.1 and 0.3 per weight, with 10 and 990 samples.
    from fedsim.aggregator.strategies import Global, Update
    from fedsim.aggregator.strategies.fedavg import FedAvg

    stages = pipeline.build(dp_settings(make_settings, DP_NOISE=0, DP_CLIP=1000))
    base = model(1.0)
    batch = stages.gather([model(1.1), model(1.3)], base, 1)
    updates = [
        Update(f"client-{k}", f"r1.c{k}", 0, n, t)
        for k, (n, t) in enumerate([(10, batch[0]), (990, batch[1])], 1)
    ]
    # Execute: FedAvg weights by samples, but every entry of the batch is the same mean.
    out = FedAvg().aggregate(Global(base, 0, 0), updates)
    # Assert: 1 + (0.1 + 0.3) / 2 = 1.2, not the count-weighted 1.298.
    np.testing.assert_allclose(out["output/bias"], 1.2, rtol=1e-6)


def test_local_dp_clips_then_noises_on_the_worker_with_std_z_times_clip(make_settings):
    settings = dp_settings(make_settings, DP="local", DP_NOISE=0.5, DP_CLIP=2.0)
    stages = pipeline.build(settings)
    base, trained = model(0.0), model(0.0)  # a zero delta: what is sent is the noise
    sent = stages.worker(Outgoing(base, trained, {"seed": 11}))
    noise = np.concatenate([t.astype(np.float64).ravel() for t in sent.tensors.values()])
    assert noise.std() == pytest.approx(0.5 * 2.0, rel=0.01)
    # The aggregator takes it as it is (no clip re-check of a noised update) and adds nothing.
    out = stages.gather([sent.tensors], base, 1)[0]
    np.testing.assert_allclose(out["hidden1/kernel"], sent.tensors["hidden1/kernel"], atol=1e-6)


def test_local_noise_is_not_drawn_from_the_task_seed(make_settings):
    # Prepare: the same update for the same task (the aggregator knows its seed) twice.
    stages = pipeline.build(dp_settings(make_settings, DP="local", DP_NOISE=1.0))
    base = model(0.0)
    # Execute
    one, two = (stages.worker(Outgoing(base, base, {"seed": 11})).tensors for _ in range(2))
    # Assert: two draws; knowing the task cannot redraw either.
    assert not np.array_equal(one["hidden1/kernel"], two["hidden1/kernel"])


def test_the_central_noise_follows_the_key_in_model_dir_not_the_seed(make_settings, tmp_path):
    # Prepare: the same settings (SEED included) on two MODEL_DIRs, and again on the first.
    first = dp_settings(make_settings, MODEL_DIR=str(tmp_path / "a"))
    other = dp_settings(make_settings, MODEL_DIR=str(tmp_path / "b"))
    base = model(0.0)
    # A worker builds the stages too: its side never reads or makes the key.
    pipeline.build(first).worker(Outgoing(base, model(0.5), {"seed": 1}))
    assert not (first.model_dir / dp.KEY_FILE).exists()
    # Execute
    drawn = [
        dp.CentralNoise.from_settings(s).gather([base], base, 3)[0]["hidden1/kernel"]
        for s in (first, other, first)
    ]
    # Assert: another key, other noise; the same key (a resumed run), the same noise.
    assert not np.array_equal(drawn[0], drawn[1])
    np.testing.assert_array_equal(drawn[0], drawn[2])
    key_file = first.model_dir / dp.KEY_FILE
    assert key_file.stat().st_mode & 0o777 == 0o600
    expected = np.random.default_rng(dp.noise_seed(dp.noise_key(first.model_dir), 3))
    noise = noise_math.gaussian(base, 1.0 * 1.0 / 1, expected)["hidden1/kernel"]
    np.testing.assert_allclose(drawn[0], noise.astype(np.float32), rtol=1e-6)


def test_the_dp_state_is_put_back_when_a_step_fails(make_settings):
    settings = dp_settings(make_settings, DP_CLIP_AT="aggregator", DP_CLIP_QUANTILE=0.5, DP_NOISE=0)
    stages = pipeline.build(settings)
    base = model(0.0)
    with pytest.raises(pipeline.Rejected), stages.kept_on_error():
        stages.gather([scaled_to(5.0)] * 4, base, 1)  # every update over C: C moves
        assert stages.state_dict()["dp"]["clip_norm"] != 1.0
        raise pipeline.Rejected("the rule refused")
    assert stages.state_dict()["dp"]["clip_norm"] == 1.0


def test_dp_off_runs_no_dp_stage(make_settings):
    assert pipeline.build(make_settings()).names == ("attack", "validate", "finite")
    on = pipeline.build(dp_settings(make_settings))
    assert on.names == ("attack", "clip", "dp", "validate", "finite")


# --- what DP refuses, one line each ------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"AGGREGATION": "fedasync"},
            "invalid setting DP='central': fedasync is asynchronous: DP needs a round rule",
        ),
        (
            {"AGGREGATION": "fedbuff"},
            "invalid setting DP='central': fedbuff is asynchronous: DP needs a round rule",
        ),
        ({"AGGREGATION": "median"}, "invalid setting DP='central': median is not an average"),
        (
            {"AGGREGATION": "trimmed-mean"},
            "invalid setting DP='central': trimmed-mean is not an average",
        ),
        (
            {"AGGREGATION": "krum", "CLIENTS_PER_ROUND": 5},
            "invalid setting DP='central': krum is not an average",
        ),
        (
            {"ATTACK": "scaled", "ATTACKERS": 1},
            "invalid setting DP='central': ATTACK=scaled: fedsim does not account for attackers",
        ),
        (
            {"DP": "local", "DP_CLIP_AT": "aggregator"},
            "invalid setting DP_CLIP_AT='aggregator': DP=local clips and noises on the worker",
        ),
        (
            {"DP": "off", "DP_EPSILON_BUDGET": 2},
            "invalid setting DP_EPSILON_BUDGET='2': a budget needs DP=central or local",
        ),
        ({"DP": "global"}, "invalid setting DP='global': one of off, central, local"),
        ({"DP_CLIP": 0}, "invalid setting DP_CLIP='0': a number > 0"),
        ({"DP_DELTA": 1}, "invalid setting DP_DELTA='1': a number >= 0 and < 1"),
    ],
)
def test_each_refused_combination_says_why_in_one_line(make_settings, overrides, message):
    with pytest.raises(config.ConfigError) as refused:
        dp_settings(make_settings, **overrides)
    text = str(refused.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_no_noise_is_allowed_and_delta_defaults_to_one_over_k_to_the_1_1(make_settings):
    settings = dp_settings(make_settings, DP_NOISE=0, NUM_CLIENTS=100, CLIENTS_PER_ROUND=10)
    assert settings.dp_noise == 0
    assert settings.delta == pytest.approx(1 / 100**1.1)
    assert math.isclose(dp_settings(make_settings, DP_DELTA=1e-5).delta, 1e-5)


# --- adaptive clipping (Andrew et al. 2021) -----------------------------------------------


def scaled_to(norm: float) -> dict[str, np.ndarray]:
    """A model whose delta from model(0.0) has global norm `norm` (every weight equal)."""
    size = sum(math.prod(shape) for _, shape in LAYOUT)
    return model(norm / math.sqrt(size))


def test_adaptive_clipping_moves_the_norm_towards_the_quantile(make_settings):
    # Prepare: no noise on the updates, next to none on the count; C0 = 1, gamma 0.5, eta 0.2.
    settings = dp_settings(
        make_settings,
        DP_NOISE=0,
        DP_CLIP_AT="aggregator",
        DP_CLIP_QUANTILE=0.5,
        DP_CLIP_COUNT_NOISE=1e-9,
    )
    stage = dp.CentralNoise.from_settings(settings)
    base = model(0.0)
    # Execute: round 1, two of four within the norm; round 2, one of four.
    stage.gather([scaled_to(n) for n in (0.5, 0.8, 3.0, 4.0)], base, 1)
    after_one = stage.clip_norm
    out = stage.gather([scaled_to(n) for n in (0.5, 3.0, 4.0, 5.0)], base, 2)[0]
    # Assert: b = 1/2 keeps C; b = 1/4 raises it by exp(-0.2 (0.25 - 0.5)) = exp(0.05).
    assert after_one == pytest.approx(1.0, abs=1e-8)
    assert stage.clip_norm == pytest.approx(math.exp(0.05), rel=1e-8)
    assert stage.state_dict() == {"params": dp.params_of(settings), "clip_norm": stage.clip_norm}
    # Round 2 clipped to the C it started with (1): (0.5 + 1 + 1 + 1) / 4.
    assert clip.norm(clip.delta_of(out, base)) == pytest.approx(3.5 / 4, rel=1e-6)


def test_adaptive_clipping_noises_the_updates_with_z_delta(make_settings):
    # z = 1, sigma_b = 2: z_delta = (1 - 1/16)^(-1/2); the std on the mean is z_delta C / m.
    settings = dp_settings(
        make_settings, DP_CLIP_AT="aggregator", DP_CLIP_QUANTILE=0.5, DP_CLIP_COUNT_NOISE=2
    )
    stage = dp.CentralNoise.from_settings(settings)
    z_delta = dp.noise_on_updates(1.0, 2.0)
    assert z_delta == pytest.approx((1 - 1 / 16) ** -0.5)
    base = model(0.0)
    noise = np.concatenate([t.ravel() for t in stage.gather([base] * 4, base, 1)[0].values()])
    assert noise.std() == pytest.approx(z_delta * 1.0 / 4, rel=0.01)


def test_adaptive_clipping_keeps_its_norm_in_the_checkpoint_state(make_settings):
    settings = dp_settings(make_settings, DP_CLIP_AT="aggregator", DP_CLIP_QUANTILE=0.5, DP_NOISE=0)
    stage = dp.CentralNoise.from_settings(settings)
    stage.load_state_dict({"clip_norm": 0.25})
    assert stage.clip_norm == 0.25 and stage.std(4) == 0.0
    fixed = dp.CentralNoise.from_settings(dp_settings(make_settings))
    assert set(fixed.state_dict()) == {"params"}  # the DP settings in force, no norm
    with pytest.raises(ValueError, match="resume with DP_CLIP_QUANTILE set as it was"):
        fixed.load_state_dict({"clip_norm": 0.25})
    with pytest.raises(ValueError, match="saved norm must be > 0"):
        stage.load_state_dict({"clip_norm": -1})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"DP_CLIP_QUANTILE": 0.5},
            "invalid setting DP_CLIP_QUANTILE='0.5': adaptive clipping needs DP=central and "
            "DP_CLIP_AT=aggregator",
        ),
        (
            {"DP_CLIP_QUANTILE": 0.5, "DP": "local"},
            "invalid setting DP_CLIP_QUANTILE='0.5': adaptive clipping needs DP=central",
        ),
        (
            {"DP_CLIP_QUANTILE": 0.5, "DP_CLIP_AT": "aggregator", "CLIENTS_PER_ROUND": 10},
            "invalid setting DP_CLIP_COUNT_NOISE='0': the count's noise (0.5; 0 means m / 20) "
            "must exceed DP_NOISE / 2 = 0.5",
        ),
    ],
)
def test_adaptive_clipping_refuses_what_it_cannot_do(make_settings, overrides, message):
    with pytest.raises(config.ConfigError) as refused:
        dp_settings(make_settings, **overrides)
    assert str(refused.value).startswith(message), str(refused.value)
