"""fedsim.experiment's runner: a real sweep, interrupted and resumed; the label on the dashboard;
the Compose engine."""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
import subprocess
from pathlib import Path

import pytest

from fedsim.experiment import runner, spec, watch
from fedsim.experiment.compose import container_memory, memory_bytes
from fedsim.experiment.local import LocalEngine
from fedsim.experiment.outcome import Raw
from fedsim.experiment.watch import RunFailed
from helpers.experiments import Recorder

ROOT = Path(__file__).resolve().parent.parent

SMALL = """
name = "tiny"
seeds = [1, 2]
workers = {workers}
target = 0.5

[settings]
PARTITION = "slices"
NUM_IMAGES_TRAIN = {images}
CLIENT_SLICES = "1 2"
ROUNDS = 2
EPOCHS = 1
MAX_WAIT = 0.5

[grid]
AGGREGATION = ["fedavg", "fedprox"]
"""


def experiment(
    tmp_path: Path, *, workers: int = 1, images: int = 500, seeds: str = ""
) -> spec.Experiment:
    text = SMALL.format(workers=workers, images=images)
    if seeds:
        text = text.replace("seeds = [1, 2]", seeds)
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return spec.load(path)


def processes_of(folder: Path) -> list[int]:
    """This user's processes whose environment names `folder`'s model folder."""
    mark = f"MODEL_DIR={folder / 'models'}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if mark in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def last_accuracy(run: Path) -> float:
    lines = (run / "history.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["accuracy"]


@pytest.mark.slow
def test_a_sweep_interrupted_after_its_first_cell_resumes_without_running_it_again(
    tmp_path, mnist_dir
):
    e = experiment(tmp_path)
    folder = tmp_path / "results" / e.name
    engine = LocalEngine(ROOT, environ={**os.environ, "DATA_DIR": str(mnist_dir)})
    planned = runner.plan(e, folder)
    lines: list[str] = []

    # The first cell's two runs finish; Ctrl-C in the middle of the second cell's first run.
    first = Recorder(4, 8.0, interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        runner.sweep(e, engine, folder, progress=first, out=lines.append)

    assert [p.result.is_file() for p in planned] == [True, True, False, False]
    half = planned[2].job.folder
    assert (half / "logs" / "aggregator.log").is_file() and processes_of(half) == []
    kept = {p.result: (p.result.read_bytes(), p.result.stat().st_mtime_ns) for p in planned[:2]}

    second = Recorder(4, 8.0)
    results = runner.sweep(e, engine, folder, progress=second, out=lines.append)

    assert second.skipped == 2
    assert second.begun == [planned[2].job.label, planned[3].job.label]
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in kept} == kept
    assert "2 finished before, 2 to run" in lines[-2]
    assert [(r["cell"], r["seed"], r["status"]) for r in results] == [
        (1, 1, "finished"), (1, 2, "finished"), (2, 1, "finished"), (2, 2, "finished"),
    ]  # fmt: skip

    # runs.csv: a row per run, saying what its history says.
    rows = list(csv.DictReader(io.StringIO((folder / "runs.csv").read_text())))
    assert [(r["AGGREGATION"], r["seed"]) for r in rows] == [
        ("fedavg", "1"), ("fedavg", "2"), ("fedprox", "1"), ("fedprox", "2"),
    ]  # fmt: skip
    for row, p in zip(rows, planned, strict=True):
        assert float(row["final_accuracy"]) == last_accuracy(p.job.folder)
        assert float(row["rounds"]) == 2 and int(row["bytes_to_workers"]) > 0
        assert int(row["peak_memory_bytes"]) > 0 and row["load_start"] and row["load_end"]
        # The aggregator's own figures, from its /metrics and the watcher's last answers.
        assert float(row["aggregator_seconds_per_round"]) > 0
        assert 0 < int(row["aggregator_peak_memory_bytes"]) < int(row["peak_memory_bytes"])
        assert int(row["status_bytes"]) > 0 and int(row["history_bytes"]) > 0
        # Memory by process at each evaluation: the aggregator's and the worker's (a worker
        # that has exited by the last evaluation is left out of it).
        curve = json.loads(p.result.read_text())["curve"]
        parts = [pt["memory_by_process"] for pt in curve if pt["memory"]]
        assert parts and parts[0].keys() == {"aggregator", "worker-1"}
        assert all("aggregator" in m and m.keys() <= {"aggregator", "worker-1"} for m in parts)
        assert all(min(m.values()) > 2**20 for m in parts)
        settings = json.loads((p.job.folder / "settings.json").read_text())
        assert settings["RUN_LABEL"] == p.job.label and settings["SEED"] == p.seed
        assert settings["AGGREGATION"] == row["AGGREGATION"]

    # summary.md: each cell's mean ± spread, computed here from runs.csv.
    summary = (folder / "summary.md").read_text()
    for rule in ("fedavg", "fedprox"):
        finals = [float(r["final_accuracy"]) for r in rows if r["AGGREGATION"] == rule]
        shown = f"{statistics.fmean(finals):.2%} ± {statistics.stdev(finals):.2%}"
        line = next(x for x in summary.splitlines() if f"| `{rule}` |" in x)
        assert shown in line
        ms = [float(r["aggregator_seconds_per_round"]) / 1e-3 for r in rows
              if r["AGGREGATION"] == rule]  # fmt: skip
        assert f"{statistics.fmean(ms):.1f} ± {statistics.stdev(ms):.1f}" in line
    assert "aggregator ms / round" in summary and "aggregator peak (MiB)" in summary
    assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The report again from the files alone says the same.
    before = (folder / "summary.md").read_text()
    (folder / "summary.md").unlink()
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "-m", "fedsim.experiment", "--report",
         str(folder)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (folder / "summary.md").read_text() == before


class Flaky:
    """An engine whose runs of `failing` labels fail as a diverged model's worker does."""

    name = "local"

    def __init__(self, failing: set[str]) -> None:
        self.failing, self.ran = failing, []

    def prepare(self) -> None:
        pass

    def run(self, job, on_entry):
        self.ran.append(job.label)
        if job.label in self.failing:
            raise RunFailed("worker-1 exited 1: the trained weights gives non-finite values")
        entries = [
            {"version": v, "round": v or None, "accuracy": 0.5 + v / 10, "loss": 1.0,
             "time": f"2026-01-01T00:00:0{v}+00:00"}
            for v in range(3)
        ]  # fmt: skip
        for entry in entries:
            on_entry(entry)
        return Raw("finished", 1767225600.0, 2.0, entries)


def test_a_failed_run_is_recorded_the_others_run_and_the_same_command_runs_it_again(tmp_path):
    e = experiment(tmp_path)
    folder = tmp_path / "results" / e.name
    planned = runner.plan(e, folder)
    bad = planned[1].job.label
    engine = Flaky({bad})

    with pytest.raises(runner.SweepFailed) as failed:
        runner.sweep(e, engine, folder, progress=Recorder(4, 8.0), out=lambda line: None)

    assert engine.ran == [p.job.label for p in planned]  # the runs after it still ran
    assert failed.value.failed == [f"{bad}: worker-1 exited 1: the trained weights gives "
                                   "non-finite values"]  # fmt: skip
    assert [p.result.is_file() for p in planned] == [True, False, True, True]
    assert "non-finite" in (planned[1].job.folder / "failed.txt").read_text()
    assert "1 of 4 runs are not done yet" in (folder / "summary.md").read_text()
    assert len((folder / "runs.csv").read_text().splitlines()) == 1 + 3

    engine.failing = set()
    results = runner.sweep(e, engine, folder, progress=Recorder(4, 8.0), out=lambda line: None)

    assert engine.ran[4:] == [bad] and len(results) == 4


def test_the_label_an_experiment_gives_a_run_is_in_its_status_and_on_the_dashboard(make_app):
    app = make_app(RUN_LABEL="tiny: cell 2/2 AGGREGATION=fedprox, seed 1 (1/2)")
    client = app.test_client()

    status = client.get("/v1/status").get_json()
    page = client.get("/").get_data(as_text=True)

    assert status["label"] == "tiny: cell 2/2 AGGREGATION=fedprox, seed 1 (1/2)"
    assert 'id="set-label"' in page


def test_a_label_must_be_one_printable_line(make_settings):
    from fedsim.config import ConfigError

    assert make_settings().run_label == ""
    with pytest.raises(ConfigError, match=r"RUN_LABEL.*one line of at most 200 printable"):
        make_settings(RUN_LABEL="two\nlines")


def test_every_run_gets_a_label_naming_its_cell_and_seed(tmp_path):
    e = experiment(tmp_path)

    labels = [p.job.label for p in runner.plan(e, tmp_path)]

    assert labels == [
        "tiny: cell 1/2 AGGREGATION=fedavg, seed 1 (1/2)",
        "tiny: cell 1/2 AGGREGATION=fedavg, seed 2 (2/2)",
        "tiny: cell 2/2 AGGREGATION=fedprox, seed 1 (1/2)",
        "tiny: cell 2/2 AGGREGATION=fedprox, seed 2 (2/2)",
    ]


@pytest.mark.docker
def test_the_compose_engine_runs_a_two_cell_experiment(tmp_path, mnist_dir):
    from docker_helpers import ProjectCopy, add_mnist, docker_info, leftovers
    from fedsim.experiment.compose import ComposeEngine

    docker_info()
    project = tmp_path / "project"
    project.mkdir()
    ProjectCopy(project, {})  # compose.yaml, the Dockerfiles, the package, ./data
    add_mnist(project, mnist_dir)
    e = experiment(tmp_path, workers=2, images=2000, seeds="seeds = [1]").with_engine("compose")
    folder = tmp_path / "results" / e.name

    results = runner.sweep(e, ComposeEngine(project), folder, progress=Recorder(2, 4.0))

    assert [(r["cell"], r["engine"], r["status"]) for r in results] == [
        (1, "compose", "finished"), (2, "compose", "finished"),
    ]  # fmt: skip
    for r in results:
        assert r["rounds"] == 2 and r["final_accuracy"] > 0.5
        assert r["bytes_to_workers"] > 0 and r["peak_memory_bytes"] > 0
        assert r["aggregator_seconds_per_round"] > 0
        assert 0 < r["aggregator_peak_memory_bytes"] < r["peak_memory_bytes"]
        assert r["status_bytes"] > 0 and r["history_bytes"] > 0
        parts = [pt["memory_by_process"] for pt in r["curve"] if pt["memory"]]
        assert parts and {"aggregator-1", "client-1", "client-2"} <= parts[0].keys()
    for p in runner.plan(e, folder):
        name = (p.job.folder / "compose.project").read_text().strip()
        assert leftovers(f"com.docker.compose.project={name}") == {
            "containers": [], "networks": [], "volumes": [],
        }  # fmt: skip
    assert (folder / "summary.md").is_file() and (folder / "curves.png").is_file()


# --- following a run, without processes -------------------------------------------------


def job(tmp_path: Path, **overrides) -> watch.Job:
    values = dict(
        settings={}, seed=1, workers=1, label="x", folder=tmp_path, per_round=1,
        expected_rounds=3.0, target=0.9, stop="rounds", timeout=0.0,
    )  # fmt: skip
    return watch.Job(**(values | overrides))


class Script:
    """A run that grows by one evaluation each time the loop sleeps; done after `done_after`."""

    def __init__(self, accuracies: list[float], done_after: int) -> None:
        self.accuracies, self.done_after = accuracies, done_after
        self.slept = 0
        self.seen: list[int] = []

    def entries(self) -> list[dict]:
        shown = self.accuracies[: self.slept + 1]
        return [{"version": v, "accuracy": a} for v, a in enumerate(shown)]

    def done(self) -> bool:
        return self.slept >= self.done_after

    def sleep(self, seconds: float) -> None:
        self.slept += 1


def follow(j: watch.Job, script: Script, clock=lambda: 0.0) -> tuple[str, list[dict], dict]:
    return watch.follow(
        j,
        entries=script.entries,
        done=script.done,
        memory=lambda: {"worker-1": 7},
        on_entry=lambda e: script.seen.append(e["version"]),
        clock=clock,
        sleep=script.sleep,
    )


def test_a_run_is_followed_to_its_end_each_evaluation_told_once(tmp_path):
    script = Script([0.1, 0.95, 0.97, 0.98], done_after=3)

    status, entries, memory = follow(job(tmp_path), script)

    assert status == "finished" and len(entries) == 4
    assert script.seen == [0, 1, 2, 3] and memory == {v: {"worker-1": 7} for v in range(4)}


def test_under_stop_target_a_run_ends_at_the_first_evaluation_that_reaches_it(tmp_path):
    script = Script([0.1, 0.5, 0.92, 0.98], done_after=3)

    status, entries, _ = follow(job(tmp_path, stop="target"), script)

    assert status == "target" and entries[-1]["accuracy"] == 0.92


def test_a_run_past_its_timeout_ends_there(tmp_path):
    script = Script([0.1, 0.2, 0.3, 0.4], done_after=3)
    times = iter([0.0, 5.0, 11.0])

    status, entries, _ = follow(job(tmp_path, timeout=10.0), script, clock=lambda: next(times))

    assert status == "timeout" and len(entries) == 2


def test_docker_stats_memory_reads_in_bytes():
    assert memory_bytes("123.5MiB / 23.4GiB") == round(123.5 * 2**20)
    assert memory_bytes("1.5GiB / 23.4GiB") == round(1.5 * 2**30)
    assert memory_bytes("812kB / 1GB") == 812_000
    assert memory_bytes("--") == 0


def test_docker_stats_memory_is_read_by_container_less_the_project_name():
    stats = (
        "fedsim-exp-1a2b-aggregator-1\t150MiB / 23.4GiB\n"
        "fedsim-exp-1a2b-client-2\t1.5GiB / 23.4GiB\n"
    )

    got = container_memory(stats, "fedsim-exp-1a2b")

    assert got == {"aggregator-1": 150 * 2**20, "client-2": round(1.5 * 2**30)}
    assert container_memory("", "fedsim-exp-1a2b") == {}
    assert container_memory("--\t0B / 0B\n", "fedsim-exp-1a2b") == {}  # stopped meanwhile
