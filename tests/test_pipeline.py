"""The update pipeline: the registry, the order of the sides, state, and the two checks."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from fedsim import models, pipeline
from fedsim.pipeline import registry
from fedsim.pipeline.base import Outgoing, Stage

LAYOUT = (("a/kernel", (2, 3)), ("a/bias", (3,)))


def tensors(fill: float = 0.5, layout=LAYOUT) -> dict[str, np.ndarray]:
    return {name: np.full(shape, fill, np.float32) for name, shape in layout}


def mlp(fill: float = 0.5) -> dict[str, np.ndarray]:
    return tensors(fill, models.SHAPES["mlp"])


# --- test stages: each leaves its name in a trace, one keeps state ---------------------


class Traced(Stage):
    def __init__(self, trace: list[str]) -> None:
        self.trace = trace

    def worker(self, update: Outgoing) -> Outgoing:
        self.trace.append(f"worker {self.name}")
        return update

    def receive(self, tensors):
        self.trace.append(f"receive {self.name}")
        return tensors

    def gather(self, batch, base, round_no):
        self.trace.append(f"gather {self.name}")
        return batch

    def publish(self, tensors):
        self.trace.append(f"publish {self.name}")
        return tensors


class Clip(Traced):
    """Runs only when the settings give it a norm; keeps a count and a residual."""

    name = "clip"

    def __init__(self, trace: list[str], norm: float) -> None:
        super().__init__(trace)
        self.norm, self.clipped, self.residual = norm, 0, np.zeros(2, np.float32)

    @classmethod
    def from_settings(cls, settings):
        return cls(settings.trace, settings.clip_norm) if settings.clip_norm else None

    def state_dict(self):
        return {"clipped": self.clipped}

    def load_state_dict(self, state):
        self.clipped = int(state["clipped"])

    def tensor_state(self):
        return {"residual": self.residual}

    def load_tensor_state(self, tensors):
        self.residual = tensors["residual"]


class Compress(Traced):
    name = "compress"

    @classmethod
    def from_settings(cls, settings):
        return cls(settings.trace)

    def worker(self, update: Outgoing) -> Outgoing:
        super().worker(update)
        return dataclasses.replace(update, meta={"codec": "none"})


@pytest.fixture
def registered(monkeypatch):
    """The registry with clip and compress (from this module) between attack and validate."""
    table = {
        "attack": registry.REGISTRY["attack"],
        "clip": f"{__name__}:Clip",
        "compress": f"{__name__}:Compress",
        "validate": registry.REGISTRY["validate"],
        "finite": registry.REGISTRY["finite"],
    }
    monkeypatch.setattr(registry, "REGISTRY", table)
    return table


def settings(**overrides) -> SimpleNamespace:
    return SimpleNamespace(**{"model": "mlp", "clip_norm": 0.0, "trace": [], **overrides})


# --- the registry ------------------------------------------------------------------------


def test_todays_stages_in_the_workers_order(make_settings):
    assert pipeline.names() == ("attack", "clip", "dp", "secagg", "validate", "compress", "finite")
    assert pipeline.build(make_settings()).names == ("attack", "validate", "finite")


def test_the_registry_picks_the_stages_the_settings_turn_on(registered):
    assert pipeline.build(settings()).names == ("attack", "compress", "validate", "finite")
    on = pipeline.build(settings(clip_norm=1.5))
    assert on.names == ("attack", "clip", "compress", "validate", "finite")
    assert on.stages[1].norm == 1.5


def test_the_worker_goes_in_order_the_aggregator_receives_in_reverse(registered):
    trace: list[str] = []
    stages = pipeline.build(settings(clip_norm=1.0, trace=trace))
    sent = stages.worker(Outgoing(mlp(0.0), mlp(0.25), {}))
    stages.receive(sent.tensors)
    stages.gather([sent.tensors], mlp(0.0), 1)
    stages.publish(sent.tensors)
    assert trace == [
        "worker clip",
        "worker compress",
        "receive compress",  # the last transform is undone first
        "receive clip",  # then re-checked: the aggregator does not trust the worker's clip
        "gather compress",
        "gather clip",
        "publish clip",
        "publish compress",
    ]
    assert sent.meta == {"codec": "none"}
    np.testing.assert_array_equal(sent.delta()["output/bias"], np.full(10, 0.25, np.float32))


def test_the_receive_side_validates_first(registered):
    stages = pipeline.build(settings(clip_norm=1.0))
    bad = mlp()
    bad["output/bias"][0] = np.nan
    with pytest.raises(pipeline.Rejected, match="output/bias contains NaN"):
        stages.receive(bad)
    assert stages.stages[1].trace == []  # refused before clip or compress saw it


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            "clpi",
            r"^unknown stage 'clpi': one of attack, clip, compress, validate, finite "
            r"\(did you mean clip\?\)$",
        ),
        ("atack", r"\(did you mean attack\?\)$"),
        ("zzz", r"^unknown stage 'zzz': one of attack, clip, compress, validate, finite$"),
    ],
)
def test_an_unknown_stage_name_is_refused_with_a_suggestion(registered, raw, message):
    with pytest.raises(ValueError, match=message):
        pipeline.parse_names(f"attack, {raw}")
    with pytest.raises(ValueError, match=message):
        pipeline.stage_class(raw)


def test_stage_names_parse_in_any_case_once_each(registered):
    assert pipeline.parse_names(" Clip, compress clip ") == ("clip", "compress")
    assert pipeline.parse_names("") == ()
    assert pipeline.stage_class("CLIP") is Clip


def test_stage_state_saves_and_loads_as_json_and_named_tensors(registered):
    stages = pipeline.build(settings(clip_norm=1.0))
    clip = stages.stages[1]
    clip.clipped, clip.residual = 3, np.array([0.5, -1.0], np.float32)
    state, saved = stages.state_dict(), stages.tensor_state()
    assert json.loads(json.dumps(state)) == {"clip": {"clipped": 3}}
    assert list(saved) == ["clip/residual"]
    again = pipeline.build(settings(clip_norm=1.0))
    again.load_state_dict(state)
    again.load_tensor_state(saved)
    assert again.stages[1].clipped == 3
    np.testing.assert_array_equal(again.stages[1].residual, [0.5, -1.0])


def test_state_of_a_stage_that_does_not_run_is_refused(registered):
    stages = pipeline.build(settings())  # no clip
    with pytest.raises(ValueError, match=r"^saved state of stages that do not run: clip$"):
        stages.load_state_dict({"clip": {"clipped": 1}})
    with pytest.raises(ValueError, match="'clip/residual' belongs to no stage that runs"):
        stages.load_tensor_state({"clip/residual": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match=r"^stage validate keeps no tensors, got x$"):
        stages.load_tensor_state({"validate/x": np.zeros(1, np.float32)})


def test_both_processes_can_import_it_without_flask_tensorflow_or_the_aggregator():
    code = (
        "import sys; import fedsim.pipeline as p; from fedsim.pipeline import attacks, checks; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('flask', 'tensorflow', 'keras') "
        "or m.startswith('fedsim.aggregator') or m.startswith('fedsim.client')]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- the attack stage through the pipeline -------------------------------------------------


def test_an_honest_task_passes_through_the_worker_side(make_settings):
    stages = pipeline.build(make_settings())
    labels = np.array([1, 7, 0])
    assert stages.relabel({"id": "t"}, labels) is None  # train on the data set's labels
    sent = stages.worker(Outgoing(tensors(0.0), tensors(0.25), {"id": "t"}))
    assert sent.tensors["a/kernel"].tolist() == [[0.25] * 3] * 2 and sent.meta == {}


def test_the_task_not_the_workers_settings_makes_an_attacker(make_settings):
    stages = pipeline.build(make_settings())  # ATTACK=none here
    flip = {"attack": {"kind": "label-flip", "seed": 1}}
    assert stages.relabel(flip, np.array([1, 7, 0])).tolist() == [8, 2, 9]
    assert stages.worker(Outgoing(tensors(1.0), tensors(2.0), flip)).tensors["a/bias"][0] == 2.0
    boost = {"attack": {"kind": "scaled", "scale": 10.0, "seed": 1}}
    assert stages.relabel(boost, np.array([3])) is None
    sent = stages.worker(Outgoing(tensors(1.0), tensors(2.0), boost))
    assert sent.tensors["a/bias"].tolist() == [11.0] * 3  # 1 + 10 (2 - 1)
    with pytest.raises(ValueError, match=r"^unknown attack kind 'x'; known: "):
        stages.worker(Outgoing(tensors(), tensors(), {"attack": {"kind": "x"}}))


# --- validate: each bad input refused, with the reason uploads sends in its 422 ------------


def test_a_good_update_passes_validation():
    pipeline.check_update(tensors(), LAYOUT)
    good = mlp()
    assert pipeline.build(SimpleNamespace(model="mlp")).receive(good) is good


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda t: t.pop("a/bias"), r"^wrong tensor names: missing \['a/bias'\], unexpected \[\]$"),
        (lambda t: t.update(extra=np.zeros(1, np.float32)), r"unexpected \['extra'\]$"),
        (lambda t: t.update({"a/bias": np.zeros(4, np.float32)}), r"shape \(4,\), expected \(3,\)"),
        (lambda t: t.update({"a/bias": np.zeros(3, np.float64)}), "float64, expected float32"),
        (lambda t: t["a/kernel"].__setitem__((0, 0), np.nan), "a/kernel contains NaN or infinity"),
        (lambda t: t["a/bias"].__setitem__(1, -np.inf), "a/bias contains NaN or infinity"),
        (lambda t: t["a/bias"].__setitem__(2, 2e6), r"^tensor a/bias holds 2e\+06, beyond 1e\+06$"),
        (lambda t: t["a/kernel"].__setitem__((1, 2), -3e38), r"a/kernel holds 3e\+38, beyond"),
    ],
)
def test_validation_refuses_each_bad_update(change, reason):
    bad = tensors()
    change(bad)
    with pytest.raises(pipeline.Rejected, match=reason):
        pipeline.check_update(bad, LAYOUT)


def test_the_bound_itself_is_allowed():
    edge = tensors(-pipeline.MAX_WEIGHT)
    pipeline.check_update(edge, LAYOUT)
    pipeline.publishable(edge)


# --- finite: the aggregate before it is published ---------------------------------------


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 1.5e6, -1e30])
def test_an_aggregate_that_is_not_finite_or_too_large_is_not_published(value):
    aggregate = tensors()
    aggregate["a/bias"][1] = value
    with pytest.raises(pipeline.Rejected) as info:
        pipeline.publishable(aggregate)
    assert info.value.tensor == "a/bias"
    assert info.value.reason == "tensor a/bias would be non-finite or beyond 1e+06"
    with pytest.raises(pipeline.Rejected):
        pipeline.build(SimpleNamespace(model="mlp")).publish(aggregate)


def test_a_finite_aggregate_is_published_as_it_is():
    aggregate = tensors(0.125)
    assert pipeline.build(SimpleNamespace(model="mlp")).publish(aggregate) is aggregate


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (0.0, True),
        (1e6, True),
        (-1e6, True),
        (1.01e6, False),
        (-1.01e6, False),
        (np.nan, False),
        (np.inf, False),
        (-np.inf, False),
    ],
)
def test_within_is_finite_and_bounded_by_max_weight(value: float, ok: bool) -> None:
    from fedsim.pipeline.checks import within

    tensor = np.zeros((4, 3), dtype=np.float32)
    tensor[2, 1] = value
    assert within(tensor) is ok
    assert within(np.zeros((0, 3), dtype=np.float32))  # nothing to refuse
