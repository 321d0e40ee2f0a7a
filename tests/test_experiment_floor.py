"""The plain Keras floor (fedsim.experiment.floor, the keras engine): the grid's engine axis,
the ratio lines of the report, and a real floor run against a real fedsim run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from fedsim.experiment import floor, report, runner, spec
from fedsim.experiment.floor import unsupported
from fedsim.experiment.local import KerasEngine, LocalEngine
from fedsim.experiment.outcome import Raw
from helpers.experiments import Recorder, refused, write

ROOT = Path(__file__).resolve().parent.parent

PAIRED = """
name = "trial"
seeds = [1, 2]
aim = 1.2

[settings]
AGGREGATION = "fedavg"
PARTITION = "slices"
NUM_IMAGES_TRAIN = 500
CLIENT_SLICES = "1 2"
ROUNDS = 2
EPOCHS = 1
MAX_WAIT = 0.5

[grid]
workers = [2, 1]
engine = ["local", "keras"]
"""


def test_the_engine_axis_pairs_each_cell_with_one_floor_cell_of_its_settings(tmp_path):
    e = spec.load(write(tmp_path, PAIRED))

    assert [(c.title, c.workers, e.engine_of(c)) for c in e.cells] == [
        ("workers=2 engine=local", 2, "local"),
        ("workers=1 process engine=keras", 1, "keras"),  # once, whatever the workers axis
        ("workers=1 engine=local", 1, "local"),
    ]
    assert e.aim == 1.2
    folders = {p.job.folder.parent.name for p in runner.plan(e, tmp_path)}
    assert len(folders) == 3  # each cell its own runs


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ('engine = ["local", "keras"]', None),
        (
            'engine = ["local", "docker"]',
            "grid.engine: 'docker' is not one of local, compose, keras",
        ),
        ('engine = [{ value = "keras", EPOCHS = 2 }]', "grid.engine: an engine takes no settings"),
    ],
)
def test_an_engine_axis_names_known_engines_only(tmp_path, change, message):
    text = PAIRED.replace('engine = ["local", "keras"]', change)
    if message is None:
        spec.load(write(tmp_path, text))
    else:
        assert message in refused(tmp_path, text)


@pytest.mark.parametrize("aim", ["0.5", "true", '"fast"'])
def test_an_aim_is_a_multiple_of_the_floor_of_at_least_one(tmp_path, aim):
    message = refused(tmp_path, PAIRED.replace("aim = 1.2", f"aim = {aim}"))

    assert "aim: " in message and "multiple of the floor's seconds >= 1" in message


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ('AGGREGATION = "median"', "AGGREGATION"),
        ('AGGREGATION = "fedadam"', "AGGREGATION"),
        ('AGGREGATION = "fedavg"\nATTACK = "label-flip"\nATTACKERS = 1', "ATTACK"),
    ],
)
def test_a_floor_cell_of_settings_it_cannot_train_is_refused_naming_the_setting(
    tmp_path, extra, key
):
    text = PAIRED.replace('AGGREGATION = "fedavg"', extra)

    message = refused(tmp_path, text)

    assert f"cell workers=1 process engine=keras: invalid setting {key}=" in message
    assert "the keras engine" in message


def test_engine_keras_on_the_command_line_runs_the_floor_once_per_settings(tmp_path):
    e = spec.load(write(tmp_path, PAIRED.replace('engine = ["local", "keras"]\n', "")))
    assert [c.workers for c in e.cells] == [2, 1]

    floor = e.with_engine("keras")

    assert [(c.title, c.workers) for c in floor.cells] == [("workers=1 process", 1)]
    median = PAIRED.replace('engine = ["local", "keras"]\n', "").replace(
        'AGGREGATION = "fedavg"', 'AGGREGATION = "median"'
    )
    with pytest.raises(spec.ExperimentError, match=r"^--engine keras: cell .*AGGREGATION="):
        spec.load(write(tmp_path, median, "median.toml")).with_engine("keras")


def test_floor_processes_share_a_floor_cell_and_must_be_a_count(tmp_path):
    e = spec.load(write(tmp_path, PAIRED.replace("aim = 1.2", "aim = 1.2\nfloor_processes = 2")))

    assert [(c.title, c.workers, e.engine_of(c)) for c in e.cells] == [
        ("workers=2 engine=local", 2, "local"),
        ("workers=2 processes engine=keras", 2, "keras"),
        ("workers=1 engine=local", 1, "local"),
    ]
    assert e.floor_processes == 2
    one = spec.load(write(tmp_path, PAIRED, "one.toml"))
    # Another number of processes is another floor: its runs have their own folder.
    assert one.cells[1].key("keras", "rounds", None) != e.cells[1].key("keras", "rounds", None)
    for bad in ("0", "true", '"two"', "65"):
        message = refused(tmp_path, PAIRED.replace("aim = 1.2", f"floor_processes = {bad}"))
        assert "floor_processes: " in message and "is not an integer >= 1 and <= 64" in message


def test_the_floor_refuses_a_process_count_it_cannot_start(capsys):
    with pytest.raises(SystemExit):
        floor._main(["--processes", "0"])
    assert "--processes must be 1 to 64, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_two_floor_processes_train_what_one_does(make_settings, mnist_dir, tmp_path):
    runs = {}
    for processes in (1, 2):
        settings = make_settings(
            AGGREGATION="fedavg", PARTITION="slices", NUM_IMAGES_TRAIN=500,
            CLIENT_SLICES="1 2", ROUNDS=2, EPOCHS=1, SEED=3,
            MODEL_DIR=tmp_path / f"floor-{processes}",
        )  # fmt: skip
        floor.run(settings, processes)
        history = (settings.model_dir / "history.jsonl").read_text().splitlines()
        runs[processes] = [json.loads(line) for line in history]
    one, two = runs[1], runs[2]
    assert [h["round"] for h in one] == [h["round"] for h in two] == [1, 2]
    for a, b in zip(one, two, strict=True):
        # The same clients, slices, seeds and weights; TensorFlow's threads differ (every
        # core, one each), so the float32 sums differ in order: a few of 10,000 images.
        assert a["clients"] == b["clients"] and a["samples"] == b["samples"]
        assert a["updates"] == b["updates"]
        assert abs(a["accuracy"] - b["accuracy"]) <= 0.0005


def test_a_floor_round_is_timed_when_its_score_came_in_not_when_it_is_written(tmp_path):
    # A pool's score of round r is read after round r + 1's trainings: the entry keeps the
    # score's own time, so the seconds between rounds are the rounds' and not the reading's.
    history = tmp_path / "history.jsonl"
    entry = {"version": 1, "round": 1, "samples": 600, "updates": 10, "clients": ["client-1"]}
    floor._record(history, entry, floor._Done((0.9, 0.3, 1.5, "2026-01-01T00:00:01.000+00:00")))

    written = json.loads(history.read_text())
    assert written == {
        "version": 1, "round": 1, "time": "2026-01-01T00:00:01.000+00:00", "accuracy": 0.9,
        "loss": 0.3, "samples": 600, "updates": 10, "clients": ["client-1"],
    }  # fmt: skip


def test_the_floor_accepts_fedavg_and_fedprox_only(make_settings):
    assert unsupported(make_settings(AGGREGATION="fedavg")) is None
    assert unsupported(make_settings(AGGREGATION="fedprox")) is None
    assert unsupported(make_settings(AGGREGATION="fedadam")).key == "AGGREGATION"


class Fake:
    """An engine that records the runs it was given and reports `seconds` for each."""

    def __init__(self, name: str, seconds: float) -> None:
        self.name, self.seconds = name, seconds
        self.ran: list[str] = []
        self.prepared = 0

    def prepare(self) -> None:
        self.prepared += 1

    def run(self, job, on_entry):
        self.ran.append(job.label)
        entries = [{"version": 1, "round": 1, "accuracy": 0.9, "loss": 0.3,
                    "time": "2026-01-01T00:00:01+00:00"}]  # fmt: skip
        return Raw("finished", 1767225600.0, self.seconds + job.seed, entries)


def test_a_sweep_runs_each_cell_on_its_engine_and_prints_the_ratio_to_the_floor(tmp_path):
    e = spec.load(write(tmp_path, PAIRED))
    local, keras = Fake("local", 12.0), Fake("keras", 9.0)
    made: list[str] = []

    def engine_for(name: str) -> Fake:
        made.append(name)
        return keras

    lines: list[str] = []
    results = runner.sweep(
        e, local, tmp_path / "out", progress=Recorder(6, 12.0), out=lines.append,
        engine_for=engine_for,
    )  # fmt: skip

    assert [len(local.ran), len(keras.ran), made] == [4, 2, ["keras"]]
    assert (local.prepared, keras.prepared) == (1, 1)
    assert [r["engine"] for r in results] == ["local", "local", "keras", "keras", "local", "local"]
    # Seed s: fedsim 12 + s seconds, the floor 9 + s: the ratio is the mean of 13/10, 14/11.
    ratios = [13 / 10, 14 / 11]
    mean = sum(ratios) / 2
    sd = math.sqrt(sum((r - mean) ** 2 for r in ratios))
    expected = f"13.5s / 10.5s = {mean:.2f}x ± {sd:.2f}x plain Keras (aim 1.2x), 2 seeds"
    assert [line for line in lines if "plain Keras" in line] == [
        f"trial workers=2  {expected}",
        f"trial workers=1  {expected}",
    ]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert (
        "## Against the plain Keras floor" in summary and f"trial workers=2  {expected}" in summary
    )


def test_a_cell_is_compared_on_the_seeds_both_finished(tmp_path):
    e = spec.load(write(tmp_path, PAIRED))
    results = []
    for cell in e.cells:
        for seed in e.seeds:
            if e.engine_of(cell) == "keras" and seed == 2:
                continue  # the floor's seed 2 did not finish
            seconds = 8.0 if e.engine_of(cell) == "keras" else 10.0 * cell.workers
            results.append({"cell": cell.number, "seed": seed, "seconds": seconds})

    lines = report.against_floor(e, results)

    assert lines == [
        "trial workers=2  20.0s / 8.0s = 2.50x plain Keras (aim 1.2x), 1 seed",
        "trial workers=1  10.0s / 8.0s = 1.25x plain Keras (aim 1.2x), 1 seed",
    ]


def test_without_a_floor_cell_there_is_no_ratio(tmp_path):
    e = spec.load(write(tmp_path, PAIRED.replace('engine = ["local", "keras"]\n', "")))
    results = [
        {"cell": c.number, "seed": s, "seconds": 10.0, "workers": c.workers}
        for c in e.cells
        for s in e.seeds
    ]

    assert report.against_floor(e, results) == []
    assert "plain Keras" not in report.summary(e, [
        r | {"axes": e.cells[r["cell"] - 1].axes} for r in results
    ])  # fmt: skip


@pytest.mark.slow
def test_the_floor_trains_what_a_fedsim_run_of_the_same_settings_trains(tmp_path, mnist_dir):
    text = PAIRED.replace("seeds = [1, 2]", "seeds = [3]").replace("workers = [2, 1]", "")
    e = spec.load(write(tmp_path, text))
    environ = {**os.environ, "DATA_DIR": str(mnist_dir)}
    folder = tmp_path / "results"

    runner.sweep(
        e, LocalEngine(ROOT, environ=environ), folder, progress=Recorder(2, 4.0),
        out=lambda line: None, engine_for=lambda name: KerasEngine(ROOT, environ=environ),
    )  # fmt: skip

    fedsim_run, floor_run = (p.job.folder for p in runner.plan(e, folder))
    ours = [json.loads(x) for x in (fedsim_run / "history.jsonl").read_text().splitlines()]
    plain = [json.loads(x) for x in (floor_run / "history.jsonl").read_text().splitlines()]
    ours = [h for h in ours if h.get("round")]
    assert [h["round"] for h in plain] == [h["round"] for h in ours] == [1, 2]
    for a, b in zip(ours, plain, strict=True):
        # The same clients, slices, seeds and weights: the same model up to the order of a
        # float32 sum, so the same test accuracy within a few of 10,000 images.
        assert a["clients"] == b["clients"] and a["samples"] == b["samples"]
        assert abs(a["accuracy"] - b["accuracy"]) <= 0.0005
    log = (floor_run / "logs" / "floor.log").read_text()
    assert log.count(" train samples 500 ") == 4 and "floor done: 4 updates trained" in log
    result = json.loads((floor_run / "result.json").read_text())
    assert result["engine"] == "keras" and result["train_seconds"] > 0
    assert result["peak_memory_bytes"] > 0 and result["seconds"] > result["train_seconds"]
