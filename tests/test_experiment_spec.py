"""fedsim.experiment.spec: the experiment file, its cells, and its one-line errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fedsim.experiment import __main__ as cli
from fedsim.experiment import spec
from helpers.experiments import refused, write

ROOT = Path(__file__).resolve().parent.parent

GOOD = """
name = "trial"
seeds = [1, 2]
workers = 2
target = 0.9

[settings]
PARTITION = "slices"
NUM_IMAGES_TRAIN = 1000
CLIENT_SLICES = "1 2 3 4"
ROUNDS = 3
EPOCHS = 1
LEARNING_RATE = 0.05
DATA_VERIFY = true

[grid]
AGGREGATION = ["fedavg", { value = "fedavgm", SERVER_LEARNING_RATE = 0.1 }]
workers = [1, 2]
"""


def test_a_good_file_makes_one_cell_per_combination_of_the_axes(tmp_path):
    e = spec.load(write(tmp_path, GOOD))

    assert (e.name, e.seeds, e.target, e.stop, e.engine) == (
        "trial",
        (1, 2),
        0.9,
        "rounds",
        "local",
    )
    assert [c.axes for c in e.cells] == [
        {"AGGREGATION": "fedavg", "workers": "1"},
        {"AGGREGATION": "fedavg", "workers": "2"},
        {"AGGREGATION": "fedavgm (SERVER_LEARNING_RATE=0.1)", "workers": "1"},
        {"AGGREGATION": "fedavgm (SERVER_LEARNING_RATE=0.1)", "workers": "2"},
    ]
    assert [c.workers for c in e.cells] == [1, 2, 1, 2]
    # TOML values become .env's spelling; a value's companions go with it only.
    assert e.cells[0].settings["LEARNING_RATE"] == "0.05"
    assert e.cells[0].settings["DATA_VERIFY"] == "true"
    assert "SERVER_LEARNING_RATE" not in e.cells[0].settings
    assert e.cells[2].settings["SERVER_LEARNING_RATE"] == "0.1"
    assert e.cells[2].settings["AGGREGATION"] == "fedavgm"


def test_each_run_resolves_as_fedsim_would_with_its_seed(tmp_path):
    e = spec.load(write(tmp_path, GOOD))

    settings = spec.resolve(e.cells[2], 7)

    assert settings.seed == 7
    assert settings.aggregation == "fedavgm"
    assert settings.server_learning_rate == pytest.approx(0.1)
    assert settings.client_slices == ((1, 1), (2, 2), (3, 3), (4, 4))
    assert spec.expected_rounds(settings) == 3


def test_an_asynchronous_rule_on_slices_expects_one_pass(tmp_path):
    e = spec.load(write(tmp_path, GOOD.replace('"fedavg", {', '"fedasync", {')))

    assert spec.expected_rounds(spec.resolve(e.cells[0], 1)) == 1  # 4 slices / 4 a round


def test_several_targets_are_reported_the_first_one_decides_the_stop(tmp_path):
    e = spec.load(write(tmp_path, GOOD.replace("target = 0.9", "target = [0.97, 0.95]")))

    assert (e.target, e.also, e.targets) == (0.97, (0.95,), (0.97, 0.95))
    assert "target: an empty list" in refused(tmp_path, GOOD.replace("target = 0.9", "target = []"))
    assert "target: [0.9, 0.9] lists an accuracy twice" in refused(
        tmp_path, GOOD.replace("target = 0.9", "target = [0.9, 0.9]")
    )


def test_the_name_defaults_to_the_files(tmp_path):
    e = spec.load(write(tmp_path, GOOD.replace('name = "trial"\n', ""), name="my-sweep.toml"))
    assert e.name == "my-sweep"


def test_a_cells_folder_changes_with_what_decides_its_runs(tmp_path):
    e = spec.load(write(tmp_path, GOOD))
    cell = e.cells[0]

    key = cell.key("local", "rounds", 0.9)

    assert key.startswith("fedavg-1-")
    assert key == cell.key("local", "rounds", 0.95)  # the target only reads the runs
    assert key != cell.key("compose", "rounds", 0.9)
    assert cell.key("local", "target", 0.9) != cell.key("local", "target", 0.95)
    assert key != e.cells[1].key("local", "rounds", 0.9)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("seeds = [1, 2]", "seeds = [1, 2]\nseed = 3"), "unknown key 'seed'; known keys: name,"),
        (
            ("EPOCHS = 1", "EPOCS = 1"),
            "settings: unknown key 'EPOCS'; known keys: AGGREGATION,",
        ),
        (
            ("EPOCHS = 1", "EPOCHS = 0"),
            "settings: invalid setting EPOCHS='0': an integer >= 1",
        ),
        (
            ('PARTITION = "slices"', 'PARTITION = "random"'),
            "settings: invalid setting PARTITION='random': one of slices, iid, shards, dirichlet",
        ),
        (
            ("workers = [1, 2]", "workers = [0]"),
            "grid.workers: 0 is not an integer >= 1 and <= 64",
        ),
        (
            ('AGGREGATION = ["fedavg", { value = "fedavgm", SERVER_LEARNING_RATE = 0.1 }]', ""),
            "",  # still a grid: workers
        ),
        (
            ("workers = 2\n", 'workers = 2\nengine = "kubernetes"\n'),
            "engine: 'kubernetes' is not one of local, compose",
        ),
        (("target = 0.9", "target = 90"), "target: 90 is not a test accuracy in (0, 1]"),
        (("target = 0.9", 'stop = "target"'), 'stop: "target" needs a target'),
        (("seeds = [1, 2]", "seeds = []"), "seeds: a non-empty list of integers >= 0"),
        (("seeds = [1, 2]", "seeds = [1, 1]"), "seeds: [1, 1] lists a seed twice"),
        (("ROUNDS = 3", "SEED = 3"), "settings: SEED cannot be set here: each run's seed comes"),
        (("ROUNDS = 3", 'MODEL_DIR = "x"'), "settings: MODEL_DIR cannot be set here"),
        (("workers = [1, 2]", "workers = [1, 2]\nEPOCHS = []"), "grid.EPOCHS: an empty list"),
        (
            ("workers = [1, 2]", 'workers = [1, 2]\nOPTIMIZER = ["sgd", "sgd"]'),
            "grid.OPTIMIZER: 'sgd' is listed twice",
        ),
        (
            ("ROUNDS = 3", 'ROUNDS = 3\nATTACK = "scaled"'),
            "cell AGGREGATION=fedavg workers=1 (seed 1): invalid setting ATTACK='scaled': "
            "ATTACK and ATTACKERS go together",
        ),
        (("workers = 2\n", "workers = 2\n[[oops]]\n"), "unknown key 'oops'"),
        (
            ("workers = [1, 2]", "workers = [1, 2]\nEPOCHS = [1, { value = 1, ROUNDS = 3 }]"),
            "cells AGGREGATION=fedavg workers=1 EPOCHS=1 and AGGREGATION=fedavg workers=1 "
            "EPOCHS=1 (ROUNDS=3) run the same settings",
        ),
    ],
)
def test_a_bad_file_is_refused_with_one_line_naming_the_key(tmp_path, change, expected):
    old, new = change
    assert old in GOOD
    text = GOOD.replace(old, new, 1)
    if not expected:
        spec.load(write(tmp_path, text))
        return
    assert expected in refused(tmp_path, text)


def test_an_empty_or_missing_grid_is_refused(tmp_path):
    head = GOOD.split("[grid]")[0]

    assert "grid: empty: give at least one axis" in refused(tmp_path, head + "[grid]\n")
    assert "grid: missing: give at least one axis" in refused(tmp_path, head)


def test_a_file_that_is_not_toml_is_refused_with_where(tmp_path):
    assert "not TOML" in refused(tmp_path, 'name = "x\n')


def test_an_unknown_engine_on_the_command_line_is_refused(tmp_path):
    e = spec.load(write(tmp_path, GOOD))
    with pytest.raises(
        spec.ExperimentError, match="--engine: 'swarm' is not one of local, compose"
    ):
        e.with_engine("swarm")
    assert e.with_engine("compose").engine == "compose"


@pytest.mark.parametrize("argv", [["--engine", "swarm"], []])
def test_the_command_refuses_a_bad_file_or_engine_before_anything_runs(
    tmp_path, capsys, monkeypatch, argv
):
    path = write(tmp_path, GOOD if argv else GOOD.replace("EPOCHS = 1", "EPOCHS = -1"))
    monkeypatch.setattr(cli, "engine_for", lambda *a: pytest.fail("an engine was made"))

    status = cli.main([str(path), "--results", str(tmp_path / "results"), *argv])

    err = capsys.readouterr().err
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("experiment: ")
    assert not (tmp_path / "results").exists()


def test_every_experiment_file_of_the_project_is_valid():
    files = sorted((ROOT / "experiments").glob("*.toml"))
    assert files
    for path in files:
        e = spec.load(path)
        assert e.name == path.stem
        assert e.cells


def test_the_script_reads_a_file_named_from_anywhere_and_refuses_a_bad_one(tmp_path):
    good = write(tmp_path, GOOD)
    bad = write(tmp_path, GOOD.replace("[grid]", "[grid]\nEPOCHS = []"), name="bad.toml")
    script = str(ROOT / "scripts" / "experiment.sh")

    listed = subprocess.run(
        [script, good.name, "--dry-run"], cwd=tmp_path, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    refusal = subprocess.run(
        [script, bad.name], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )

    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.splitlines()) == 8  # 4 cells x 2 seeds
    assert (
        "trial: cell 4/4 AGGREGATION=fedavgm (SERVER_LEARNING_RATE=0.1) workers=2" in listed.stdout
    )
    assert refusal.returncode == 2
    assert (
        refusal.stderr
        == f"experiment: {bad}: grid.EPOCHS: an empty list: give the values to compare\n"
    )
