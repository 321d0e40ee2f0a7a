"""The messages between aggregator and worker: their JSON, as earlier versions sent it, and
every way a message is refused."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedsim.protocol import (
    Ask,
    Attack,
    EvalTask,
    Evaluation,
    Invalid,
    Offer,
    TrainSettings,
    TrainTask,
    UpdateMeta,
    client_id,
    client_number,
    digits,
    task_from_json,
    valid_id,
    worker_id,
)

SETTINGS = TrainSettings(
    epochs=5, batch_size=10, learning_rate=0.01, optimizer="sgd", model="mlp", proximal_mu=0.1
)
PLAN = {"PARTITION": "slices", "SEED": 42, "NUM_IMAGES_TRAIN": 5000, "CLIENT_SLICES": "1-4"}

# A slice task of an attacker and an evaluation task exactly as the aggregator sent them
# before the records existed: a worker of that version reads these.
SLICE_TASK_JSON = {
    "id": "c1.s1",
    "lease": "0123abcd",
    "kind": "train",
    "client": "client-1",
    "samples": 5000,
    "sha256": "aa",
    "base_version": 3,
    "seed": 1954384782,
    "train": {
        "model": "mlp",
        "epochs": 5,
        "batch_size": 10,
        "learning_rate": 0.01,
        "optimizer": "sgd",
        "proximal_mu": 0.1,
    },
    "partition": PLAN,
    "slice": 1,
    "slices": "1-4",
    "round": None,
    "attack": {"kind": "scaled", "scale": 10.0, "seed": 1954384782},
    "worker": "w1",
    "timeout": 30.0,
}
SAMPLED_TASK_JSON = {
    **{k: v for k, v in SLICE_TASK_JSON.items() if k not in ("slice", "slices", "attack")},
    "id": "u1.c2",
    "client": "client-2",
    "train": {k: v for k, v in SLICE_TASK_JSON["train"].items() if k != "proximal_mu"},
}
EVAL_TASK_JSON = {
    "id": "eval.v3",
    "lease": "ff",
    "kind": "evaluate",
    "version": 3,
    "worker": "w2",
    "timeout": 30.0,
}


# --- ids ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["", "a" * 129, "a\nb", "tab\t", "\x7f", "\x85", "\u2028", "\u202e", "\u2066x", "end\n"],
)
def test_an_id_with_a_control_or_reordering_character_or_out_of_length_is_refused(value) -> None:
    assert not valid_id(value)


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1))
def test_any_printable_ascii_id_up_to_128_characters_is_accepted(value: str) -> None:
    assert valid_id(value) is (len(value) <= 128)


@given(st.text(min_size=1, max_size=128))
def test_no_accepted_id_can_break_or_reorder_a_log_line(value: str) -> None:
    if valid_id(value):
        assert not set(value) & set("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\u202e\u2067")


@given(st.integers(1, 10**9))
def test_a_planned_clients_id_names_its_number(n: int) -> None:
    assert client_number(client_id(n)) == n


@pytest.mark.parametrize("value", ["client-0", "client-01", "client-", "Alice", "client-1 "])
def test_other_client_ids_have_no_number(value: str) -> None:
    assert client_number(value) is None


# --- tasks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("wire", [SLICE_TASK_JSON, SAMPLED_TASK_JSON, EVAL_TASK_JSON])
def test_a_task_reads_and_writes_the_json_earlier_versions_sent(wire: dict) -> None:
    task = task_from_json(wire)
    assert task.to_json() == wire
    assert task_from_json(task.to_json()) == task


def test_a_tasks_run_id_round_trips() -> None:
    task = task_from_json({**SAMPLED_TASK_JSON, "run": "0f1e2d3c4b5a6978"})
    assert isinstance(task, TrainTask) and task.run == "0f1e2d3c4b5a6978"
    assert task_from_json(task.to_json()) == task


def test_a_slice_task_reads_as_typed_fields() -> None:
    task = task_from_json(SLICE_TASK_JSON)
    assert isinstance(task, TrainTask)
    assert (task.client_number, task.slice, task.round) == (1, 1, None)
    assert task.train == SETTINGS and task.train.mu == 0.1
    assert task.attack == Attack("scaled", 10.0, 1954384782)
    assert isinstance(task_from_json(EVAL_TASK_JSON), EvalTask)


def test_an_offer_round_trips_with_and_without_a_task() -> None:
    idle = Offer(None, reason="waiting for round 1 to close", retry_after=2.0, worker="w3")
    assert idle.to_json() == {
        "task": None,
        "worker": "w3",
        "finished": False,
        "surplus": False,
        "reason": "waiting for round 1 to close",
        "retry_after": 2.0,
    }
    assert Offer.from_json(idle.to_json()) == idle
    busy = Offer(task_from_json(EVAL_TASK_JSON), worker="w2")
    assert Offer.from_json(busy.to_json()) == busy
    # An answer without the optional fields reads with their defaults.
    assert Offer.from_json({}) == Offer(None)


def bad(change: dict, drop: tuple[str, ...] = ()) -> dict:
    return {**{k: v for k, v in SLICE_TASK_JSON.items() if k not in drop}, **change}


@pytest.mark.parametrize(
    ("wire", "detail"),
    [
        ({**EVAL_TASK_JSON, "kind": "mine"}, "a task of unknown kind 'mine'"),
        (bad({}, drop=("kind",)), "a task of unknown kind None"),
        (bad({"id": "a\nb"}), "a task id must be 1-128 characters"),
        (bad({"id": 7}), "id is missing or not a string"),
        (bad({"lease": "XYZ"}), "its lease must be 1-64 hex digits"),
        (bad({"client": "Alice"}), "names 'Alice', not client-N"),
        (bad({"samples": -1}), "samples must be an integer >= 0, got -1"),
        (bad({"base_version": True}), "base_version is missing or not an integer"),
        (bad({"seed": 1.5}), "seed is missing or not an integer"),
        (bad({}, drop=("sha256",)), "sha256 is missing or not a string"),
        (bad({"partition": []}), "partition is missing or not an object"),
        (bad({"slice": "1"}), "slice is missing or not an integer"),
        (bad({"round": 1.0}), "round is missing or not an integer"),
        (bad({"attack": "scaled"}), "attack is missing or not an object"),
        (bad({"attack": {"kind": "noise", "scale": 1}}), "seed is missing or not an integer"),
        (bad({"timeout": "30"}), "timeout must be a number, got '30'"),
        (bad({"run": "../x"}), "a task's run must be 1-64 ASCII letters and digits"),
        (bad({"run": 7}), "run is missing or not a string"),
        (bad({"train": None}), "train is missing or not an object"),
        (bad({"train": {**SETTINGS.to_json(), "epochs": 0}}), "epochs must be an integer >= 1"),
        (
            bad({"train": {**SETTINGS.to_json(), "learning_rate": 0}}),
            "learning_rate must be a finite number > 0",
        ),
        (
            bad({"train": {**SETTINGS.to_json(), "optimizer": None}}),
            "optimizer is missing or not a string",
        ),
        ({**EVAL_TASK_JSON, "version": -3}, "version must be an integer >= 0, got -3"),
    ],
)
def test_a_task_that_breaks_the_protocol_is_refused_in_one_line(wire: dict, detail: str) -> None:
    with pytest.raises(Invalid) as refused:
        task_from_json(wire)
    assert detail in refused.value.detail and refused.value.code == "bad_task"
    assert "\n" not in refused.value.detail


@pytest.mark.parametrize("mu", [-0.1, float("nan"), float("inf"), "much", "0.01", [1], True])
def test_a_bad_proximal_mu_is_refused(mu) -> None:
    with pytest.raises(Invalid, match=r"^proximal_mu must be a finite number >= 0, got "):
        TrainSettings.from_json({**SETTINGS.to_json(), "proximal_mu": mu})


@pytest.mark.parametrize("momentum", [-0.1, 1, 1.5, float("nan"), float("inf"), "0.9", True])
def test_a_bad_momentum_is_refused(momentum) -> None:
    with pytest.raises(Invalid, match=r"^momentum (must be a number >= 0 and < 1|is missing or)"):
        TrainSettings.from_json({**SETTINGS.to_json(), "momentum": momentum})


def test_settings_without_model_or_mu_train_the_plain_model_and_are_sent_without_them() -> None:
    wire = {"epochs": 1, "batch_size": 50, "learning_rate": 0.05, "optimizer": "sgd"}
    plain = TrainSettings.from_json(wire)
    assert (plain.model, plain.proximal_mu, plain.mu) == (None, None, 0.0)
    # An aggregator before MOMENTUM sent none: sgd keeps the momentum it always had.
    assert plain.sgd_momentum == 0.9
    assert TrainSettings.from_json({**wire, "momentum": 0}).sgd_momentum == 0
    assert plain.to_json() == wire and TrainSettings.of(plain) is plain
    assert TrainSettings.of({**wire, "proximal_mu": 0}).to_json()["proximal_mu"] == 0.0


# --- what a worker sends ----------------------------------------------------------------------


def test_a_request_for_work_round_trips_and_a_bad_retry_count_counts_zero() -> None:
    assert Ask.from_json(Ask("host-1-ab", 4).to_json()) == Ask("host-1-ab", 4)
    for retries in (-1, 10**9, True, "3", None):
        assert Ask.from_json({"worker": "w", "retries": retries}).retries == 0


@pytest.mark.parametrize("body", [{}, {"worker": ""}, {"worker": 5}, {"worker": "a\u202eb"}])
def test_a_request_without_a_printable_worker_id_is_refused(body: dict) -> None:
    for read in (worker_id, Ask.from_json, Evaluation.from_json):
        with pytest.raises(Invalid) as refused:
            read(body)
        assert (refused.value.code, refused.value.status) == ("bad_worker", 400)


def test_an_evaluation_round_trips() -> None:
    scored = Evaluation("host-1-ab", "eval.v3", "ff00", 0.97, 0.11)
    assert scored.to_json() == {
        "worker": "host-1-ab",
        "task": "eval.v3",
        "lease": "ff00",
        "accuracy": 0.97,
        "loss": 0.11,
    }
    assert Evaluation.from_json(scored.to_json()) == scored
    # Integers are numbers too.
    assert Evaluation.from_json({**scored.to_json(), "accuracy": 1, "loss": 0}).accuracy == 1.0


GOOD_EVALUATION = {"worker": "w", "task": "eval.v0", "lease": "ab", "accuracy": 0.5, "loss": 1}


@pytest.mark.parametrize(
    ("change", "code", "detail"),
    [
        ({"task": None}, "bad_task", "task must be the evaluation task's id"),
        ({"task": "a\nb"}, "bad_task", "task must be the evaluation task's id"),
        ({"lease": 7}, "bad_task", "lease must be the task's lease"),
        ({"lease": "a-b"}, "bad_task", "lease must be the task's lease"),
        ({"lease": "a" * 65}, "bad_task", "lease must be the task's lease"),
        ({"accuracy": None}, "bad_metrics", "accuracy must be a number"),
        ({"accuracy": True}, "bad_metrics", "accuracy must be a number"),
        ({"accuracy": 2}, "bad_metrics", "accuracy must be a number from 0 to 1"),
        ({"loss": -1}, "bad_metrics", "loss must be a number from 0 to 1e+09"),
        ({"loss": 10**400}, "bad_metrics", "loss must be a number from 0 to 1e+09"),
        ({"loss": math.nan}, "bad_metrics", "loss must be a number from 0 to 1e+09"),
    ],
)
def test_an_evaluation_that_breaks_the_protocol_is_refused(change, code, detail) -> None:
    with pytest.raises(Invalid) as refused:
        Evaluation.from_json({**GOOD_EVALUATION, **change})
    assert (refused.value.code, refused.value.detail, refused.value.status) == (code, detail, 400)


# --- an update's metadata ---------------------------------------------------------------------

TASK_META = UpdateMeta(
    client_id="client-2",
    update_id="r3.c2",
    base_version=7,
    num_samples=600,
    task="r3.c2",
    lease="0a1b",
    slice="5",
    slices="5-8",
    round=3,
    loss=0.25,
    accuracy=0.875,
    retries=2,
)


def read(meta: dict[str, str]) -> UpdateMeta:
    return UpdateMeta.from_json(meta, max_samples=60_000)


def test_a_workers_metadata_is_strings_as_earlier_versions_sent_them() -> None:
    assert TASK_META.to_json() == {
        "client_id": "client-2",
        "update_id": "r3.c2",
        "task": "r3.c2",
        "lease": "0a1b",
        "base_version": "7",
        "num_samples": "600",
        "slice": "5",
        "slices": "5-8",
        "round": "3",
        "retries": "2",
        "loss": "0.250000",
        "accuracy": "0.875000",
    }
    assert read(TASK_META.to_json()) == TASK_META
    assert TASK_META.extra() == {
        "slice": "5",
        "slices": "5-8",
        "loss": 0.25,
        "accuracy": 0.875,
        "retries": 2,
    }


def test_a_hand_started_clients_metadata_has_no_task_and_sends_no_lease() -> None:
    typed = UpdateMeta("Alice's laptop", "9f2c", 0, 5000, lease="ignored", slice="1")
    assert "lease" not in typed.to_json() and "task" not in typed.to_json()
    assert read(typed.to_json()) == UpdateMeta("Alice's laptop", "9f2c", 0, 5000, slice="1")
    assert read({"client_id": "a", "update_id": "b", "base_version": "0", "num_samples": "1"})


def test_a_stages_fields_travel_beside_and_never_override_the_protocols() -> None:
    meta = UpdateMeta("client-1", "u", 0, 1, stages={"codec": "int8", "client_id": "forged"})
    wire = meta.to_json()
    assert wire["codec"] == "int8" and wire["client_id"] == "client-1"
    assert read(wire).stages == {"codec": "int8"}


def test_the_round_is_for_log_lines_and_never_refused() -> None:
    base = {"client_id": "a", "update_id": "b", "base_version": "0", "num_samples": "1"}
    for raw, got in (("3", 3), ("-1", None), ("x", None), ("٣", None), ("9" * 19, None)):
        assert read({**base, "round": raw}).round == got


GOOD_META = {"client_id": "c", "update_id": "u", "base_version": "0", "num_samples": "10"}


@pytest.mark.parametrize(
    ("change", "status", "code", "detail"),
    [
        ({"client_id": None}, 400, "bad_metadata", "metadata has no client_id"),
        ({"update_id": "a\u2028b"}, 400, "bad_metadata", "update_id must be 1-128 characters"),
        ({"base_version": "-1"}, 400, "bad_metadata", "base_version must be an integer >= 0"),
        ({"base_version": "1" * 19}, 400, "bad_metadata", "base_version must be an integer"),
        ({"base_version": "x" * 50}, 400, "bad_metadata", "got 'xxxxxxxxxx"),
        ({"slice": "5\n"}, 400, "bad_metadata", "slice must look like 3 or 1-4"),
        ({"slices": "a-b"}, 400, "bad_metadata", "slices must look like 3 or 1-4"),
        ({"loss": "nan"}, 400, "bad_metadata", "loss must be a finite number"),
        ({"accuracy": "high"}, 400, "bad_metadata", "accuracy must be a finite number"),
        ({"retries": "-2"}, 400, "bad_metadata", "retries must be an integer >= 0"),
        ({"num_samples": "0"}, 422, "bad_num_samples", "num_samples must be an integer >= 1"),
        ({"num_samples": "60001"}, 422, "bad_num_samples", "and <= 60000, got '60001'"),
        ({"num_samples": None}, 422, "bad_num_samples", "got None"),
        ({"task": "u", "lease": "XY"}, 400, "bad_metadata", "lease must be the task's lease"),
        ({"task": "u"}, 400, "bad_metadata", "lease must be the task's lease"),
        ({"task": "v", "lease": "ab"}, 400, "bad_metadata", "update_id must be the task id"),
    ],
)
def test_metadata_that_breaks_the_protocol_is_refused(change, status, code, detail) -> None:
    meta = {k: v for k, v in {**GOOD_META, **change}.items() if v is not None}
    with pytest.raises(Invalid) as refused:
        read(meta)
    assert (refused.value.status, refused.value.code) == (status, code)
    assert detail in refused.value.detail


def test_the_first_broken_field_is_the_one_named() -> None:
    # The order of the checks: ids, base_version, the optional fields, num_samples, task.
    with pytest.raises(Invalid, match="base_version"):
        read({**GOOD_META, "base_version": "x", "num_samples": "0", "loss": "nan"})
    with pytest.raises(Invalid, match="loss"):
        read({**GOOD_META, "num_samples": "0", "loss": "nan"})


def test_the_protocol_imports_nothing_heavy() -> None:
    import os
    import subprocess
    import sys

    code = (
        "import sys, fedsim.protocol; "
        "heavy = {'numpy', 'flask', 'tensorflow', 'keras'} & set(sys.modules); "
        "ours = [m for m in sys.modules if m.startswith('fedsim.') and "
        "not m.startswith('fedsim.protocol')]; print(sorted(heavy), ours)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "[] []"


# --- numbers: ASCII digits alone ---------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    ["5000\n", " 5000", "5000 ", "+5000", "-5000", "5_000", "\u0665\u0660\u0660\u0660",
     "\uff15\uff10\uff10\uff10", "5e3", "0x10", "", "1" * 19],
)  # fmt: skip
def test_an_integer_is_ascii_digits_alone(raw: str) -> None:
    assert digits(raw) is None
    with pytest.raises(Invalid) as refused:
        read({**GOOD_META, "num_samples": raw})
    assert (refused.value.status, refused.value.code) == (422, "bad_num_samples")
    with pytest.raises(Invalid) as version:
        read({**GOOD_META, "base_version": raw})
    assert (version.value.status, version.value.code) == (400, "bad_metadata")


def test_plain_digits_are_read() -> None:
    assert [digits(raw) for raw in ("0", "007", "5000", "9" * 18)] == [0, 7, 5000, 10**18 - 1]
    assert read({**GOOD_META, "num_samples": "5000", "base_version": "12"}).num_samples == 5000


@pytest.mark.parametrize("raw", [" 0.5", "0.5\n", "+0.5", "1_0.5", "inf", "1e3", "\u0660.5", "."])
def test_a_metric_is_a_plain_decimal(raw: str) -> None:
    with pytest.raises(Invalid, match="loss must be a finite number in ASCII digits"):
        read({**GOOD_META, "loss": raw})
    assert read({**GOOD_META, "loss": "0.125000"}).loss == 0.125


def test_a_runs_training_json_carries_its_settings_and_its_rules_and_reads_back():
    from fedsim import config
    from fedsim.protocol.tasks import training_json

    settings = config.load(
        {
            "MODEL": "cnn",
            "EPOCHS": "3",
            "BATCH_SIZE": "20",
            "LEARNING_RATE": "0.2",
            "MOMENTUM": "0",
            "OPTIMIZER": "sgd",
        }
    )
    sent = training_json(settings, {"proximal_mu": 0.5})
    assert TrainSettings.from_json(sent) == TrainSettings(
        epochs=3, batch_size=20, learning_rate=0.2, optimizer="sgd", model="cnn",
        proximal_mu=0.5, momentum=0.0,
    )  # fmt: skip
    assert "proximal_mu" not in training_json(settings, {})
