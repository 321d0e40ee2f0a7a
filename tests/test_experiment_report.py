"""fedsim.experiment's report (runs.csv, summary.md, curves.png), a run's figures, the progress line.

The report is made from hand-made results; its means and spreads are checked
against numbers computed here from the same values.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from pathlib import Path

import pytest

from fedsim.experiment import curves, outcome, progress, report, spec, tables

SWEEP = """
name = "hand"
seeds = [1, 2, 3]
workers = 2
target = 0.9

[settings]
PARTITION = "slices"
CLIENT_SLICES = "1 2"
ROUNDS = 4

[grid]
AGGREGATION = ["fedavg", "median"]
EPOCHS = [1, 2]
"""
# cell -> final accuracy per seed (cells in the grid's order: fedavg/1, fedavg/2, median/1, ...)
FINAL = {1: [0.91, 0.93, 0.95], 2: [0.96, 0.92, 0.94], 3: [0.90, 0.90, 0.93], 4: [0.81, 0.99]}
# cell -> rounds to 0.9 per seed (None: not reached)
TO_TARGET = {1: [3, 2, 2], 2: [1, None, 4], 3: [4, 4, 3], 4: [None, 2]}


def independent_mean_sd(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def result(cell: spec.Cell, seed: int, final: float, to_target: int | None) -> dict:
    curve = [
        {"x": float(x), "round": x or None, "version": x, "accuracy": final * x / 4,
         "loss": 1.0, "seconds": 10.0 * x, "memory": None}
        for x in range(5)
    ]  # fmt: skip
    return {
        "experiment": "hand", "cell": cell.number, "axes": cell.axes,
        "settings": {**cell.settings, "SEED": str(seed)}, "seed": seed, "workers": 2,
        "engine": "local", "status": "finished", "rounds": 4.0, "evaluations": 4,
        "final_accuracy": final, "final_loss": 0.3, "best_accuracy": final, "best_round": 4.0,
        "target": 0.9, "rounds_to_target": to_target,
        "seconds_to_target": None if to_target is None else 10.0 * to_target,
        "seconds": 40.0 + seed, "seconds_per_round": 10.0, "train_seconds": 20.0,
        "outside_training": 0.75, "bytes_to_workers": 4_000_000, "bytes_from_workers": 3_000_000,
        "peak_memory_bytes": 2**30, "memory_growth_bytes": None, "refused_aggregates": 0,
        "load_start": 0.5 + seed / 10, "load_end": 0.7, "fedsim": "0.1.0", "cpus": 2,
        "memory_bytes": 24 * 2**30, "finished_at": "2026-01-01T00:00:00+00:00", "curve": curve,
    }  # fmt: skip


@pytest.fixture
def sweep(tmp_path: Path) -> tuple[spec.Experiment, list[dict]]:
    path = tmp_path / "hand.toml"
    path.write_text(SWEEP)
    e = spec.load(path)
    results = [
        result(cell, seed, final, to)
        for cell in e.cells
        for seed, final, to in zip(
            e.seeds, FINAL[cell.number], TO_TARGET[cell.number], strict=False
        )
    ]
    return e, results


def test_runs_csv_has_a_row_per_cell_and_seed_with_its_settings(sweep, tmp_path):
    e, results = sweep

    report.write_csv(e, results, tmp_path / "runs.csv")

    rows = list(csv.DictReader(io.StringIO((tmp_path / "runs.csv").read_text())))
    assert len(rows) == 11
    first = rows[0]
    assert (first["cell"], first["AGGREGATION"], first["EPOCHS"], first["seed"]) == (
        "1",
        "fedavg",
        "1",
        "1",
    )
    assert first["settings"] == (
        'PARTITION=slices CLIENT_SLICES="1 2" ROUNDS=4 AGGREGATION=fedavg EPOCHS=1 SEED=1'
    )
    assert [float(r["final_accuracy"]) for r in rows] == [v for c in FINAL.values() for v in c]
    assert rows[4]["rounds_to_target"] == ""  # not reached
    for column in ("bytes_to_workers", "peak_memory_bytes", "load_start", "fedsim", "cpus"):
        assert first[column]


def test_summary_gives_mean_and_spread_over_the_seeds_and_bolds_the_best_cell(sweep):
    e, results = sweep

    text = report.summary(e, results)

    cells = text.split("## Cells")[1].split("## By")[0]
    lines = [line for line in cells.splitlines() if line.startswith("| ")][1:]
    assert len(lines) == 4
    means = {n: independent_mean_sd(v)[0] for n, v in FINAL.items()}
    best = max(means, key=means.get)
    for n, line in zip(FINAL, lines, strict=True):
        m, sd = independent_mean_sd(FINAL[n])
        value = f"{m:.2%} ± {sd:.2%}"
        assert (f"**{value}**" if n == best else f" {value} ") in line
        assert line.startswith(f"| **{n}** |" if n == best else f"| {n} |")
        reached = [r for r in TO_TARGET[n] if r is not None]
        if len(reached) > 1:
            rm, rsd = independent_mean_sd(reached)
            assert f"{rm:.1f} ± {rsd:.1f} ({len(reached)}/{len(TO_TARGET[n])})" in line
        else:
            assert f"{reached[0]:.1f} (1/{len(TO_TARGET[n])})" in line
    assert "0.60-0.80" in lines[0]  # the load of its runs: 0.6, 0.7, 0.8 at their starts
    # The run's peak in GiB (every run's 2**30 bytes here), the bytes moved in MB.
    head = cells.splitlines()[2].split(" | ")
    assert (head[-3], head[-2]) == ("MB to / from workers", "peak memory (GiB)")
    assert all(line.split(" | ")[-2] == "1.00 ± 0.00" for line in lines)


def test_summary_has_a_table_per_axis_with_the_best_of_each_column_in_bold(sweep):
    e, results = sweep

    text = report.summary(e, results)

    by_rule = text.split("## By AGGREGATION: final accuracy")[1].split("## By")[0]
    assert "| AGGREGATION | EPOCHS=1 | EPOCHS=2 |" in by_rule
    m1, s1 = independent_mean_sd(FINAL[1])
    m3, s3 = independent_mean_sd(FINAL[3])
    assert f"| `fedavg` | **{m1:.2%} ± {s1:.2%}** |" in by_rule  # fedavg beats median at E=1
    assert f"| `median` | {m3:.2%} ± {s3:.2%} |" in by_rule
    assert "## By EPOCHS: final accuracy" in text
    assert "| EPOCHS | AGGREGATION=fedavg | AGGREGATION=median |" in text
    assert "1 of 12 runs are not done yet." in text


def test_summary_states_the_version_the_machine_and_the_load(sweep):
    e, results = sweep

    head = report.summary(e, results).split("## Cells")[0]

    assert "fedsim 0.1.0; the local engine; 2 cores, 24.0 GiB of memory" in head
    assert "1-minute load of 0.60-0.80" in head
    assert 'Every cell: PARTITION=slices CLIENT_SLICES="1 2" ROUNDS=4' in head
    spent = sum(r["seconds"] * 2 for r in results)
    assert f"{1 - 20 * len(results) / spent:.0%} of the workers' time" in head


def test_further_targets_get_their_own_columns(sweep, tmp_path):
    e, results = sweep
    e = dataclasses.replace(e, target=0.9, also=(0.95,))
    for r in results:  # a seed reaches 95% in cell 1 only, at round 3
        hit = r["cell"] == 1 and r["seed"] == 1
        r["also"] = [{"target": 0.95, "rounds": 3.0 if hit else None, "seconds": None}]

    report.write_csv(e, results, tmp_path / "runs.csv")
    text = report.summary(e, results)

    rows = list(csv.DictReader(io.StringIO((tmp_path / "runs.csv").read_text())))
    assert [r["rounds_to_0.95"] for r in rows[:3]] == ["3.0", "", ""]
    assert "| rounds to 90%, interpolated | seconds to 90% | rounds to 95% |" in text
    assert "| 3.0 (1/3) |" in text and "target: 90%, 95% test accuracy" in text


def test_rounds_run_show_one_decimal_only_when_the_seeds_stopped_apart(sweep):
    e, results = sweep
    cell = [r for r in results if r["cell"] == 1]
    for r, rounds in zip(cell, (23.0, 21.0, 20.0), strict=True):  # stopped at the target
        r["rounds"] = rounds

    lines = report.summary(e, results).split("## Cells")[1].splitlines()

    row = {line.split(" | ")[0].strip("|* "): line.split(" | ") for line in lines if "`" in line}
    at = lines[2].split(" | ").index("rounds")
    assert row["1"][at] == "21.3 ± 1.5"  # not 21.3333 ± 1.52753
    assert row["3"][at] == "4 ± 0"  # every seed ran all 4


def test_one_seed_shows_its_value_alone():
    assert tables.shown([0.9123]) == "91.23%"
    assert tables.shown([]) == "-"
    assert tables.reached([{"r": None}, {"r": None}], "r") == "not reached (0/2)"


def test_the_curves_band_is_the_spread_over_the_seeds_at_each_round(sweep, tmp_path):
    e, results = sweep
    runs = [r for r in results if r["cell"] == 1]

    xs, means, sds = curves.band(runs)

    assert xs == [0.0, 1.0, 2.0, 3.0, 4.0]
    m, sd = independent_mean_sd([f * 2 / 4 for f in FINAL[1]])
    assert means[2] == pytest.approx(m) and sds[2] == pytest.approx(sd)
    curves.plot(e, results, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_is_written_again_from_the_runs_files(sweep, tmp_path):
    e, results = sweep
    folder = tmp_path / "results"
    for cell in e.cells:
        for r in results:
            if r["cell"] == cell.number:
                run = folder / "runs" / cell.key("local", "rounds", 0.9) / f"seed-{r['seed']}"
                run.mkdir(parents=True)
                (run / "result.json").write_text(json.dumps(r))

    found = report.collect(e, folder, "local")
    written = report.write(e, found, folder)

    assert [(r["cell"], r["seed"]) for r in found] == [(r["cell"], r["seed"]) for r in results]
    assert [p.name for p in written] == ["runs.csv", "summary.md", "curves.png"]
    assert report.collect(e, folder, "compose") == []  # another engine's cells are others


# --- a run's figures --------------------------------------------------------------------


def history(*accuracies: float, per_round: int = 0) -> list[dict]:
    """Entries a second apart from 2026-01-01T00:00:10 on; async when per_round is given."""
    return [
        {"version": v, "round": None if per_round or v == 0 else v, "updates": v * per_round,
         "time": f"2026-01-01T00:00:{10 + v:02d}+00:00", "accuracy": a, "loss": 1 - a}
        for v, a in enumerate(accuracies)
    ]  # fmt: skip


START = 1767225600.0  # 2026-01-01T00:00:00Z


def test_a_run_is_measured_from_its_history_logs_and_metrics():
    raw = outcome.Raw(
        status="finished",
        started=START,
        seconds=20.0,
        entries=history(0.1, 0.8, 0.92, 0.91, 0.95, 0.96, 0.94),
        memory_at={
            1: {"aggregator": 40, "worker-1": 60},
            5: {"aggregator": 100, "worker-1": 200},
            6: {"aggregator": 90, "worker-1": 260},
        },
        peak_memory=400,
        worker_logs="w1 client-1 round 1 train samples 600 loss 0.5 acc 0.8 (1.5s)\n"
        "w2 client-2 round 1 train samples 600 loss 0.5 acc 0.8 (2.5s)\n"
        "w1 done: 1 updates trained (client-1), 0 evaluations, pushes 1 accepted, 19.5s\n"
        "w2 done: 1 updates trained (client-2), 0 evaluations, pushes 1 accepted, 18.0s\n",
        aggregator_log="refused aggregate: not finite\n",
        metrics="# TYPE fedsim_sent_bytes_total counter\nfedsim_sent_bytes_total 1.5e+06\n"
        "fedsim_received_bytes_total 797520.0\n",
        load_start=0.4,
        load_end=0.6,
    )

    got = outcome.measure(raw, per_round=10, workers=2, target=0.9, also=(0.95, 0.99))

    assert (got["final_accuracy"], got["best_accuracy"], got["best_round"]) == (0.94, 0.96, 5.0)
    assert got["also"] == [
        {"target": 0.95, "rounds": 4.0, "seconds": 14.0, "sim_seconds": None},
        {"target": 0.99, "rounds": None, "seconds": None, "sim_seconds": None},
    ]
    assert got["sim_seconds_to_target"] is None  # the real clock: no simulated time
    assert got["slowest_worker_seconds"] == 19.5
    assert (got["rounds_to_target"], got["seconds_to_target"]) == (2.0, 12.0)
    assert got["rounds_to_target_interpolated"] == 1.83  # 1 + (0.9 - 0.8) / (0.92 - 0.8)
    assert got["seconds_per_round"] == 1.0
    assert got["train_seconds"] == 4.0 and got["outside_training"] == 1 - 4.0 / 40.0
    assert (got["bytes_to_workers"], got["bytes_from_workers"]) == (1_500_000, 797_520)
    assert got["memory_growth_bytes"] == 50 and got["peak_memory_bytes"] == 400
    assert got["memory_growth_by_process"] == {"aggregator": -10, "worker-1": 60}
    # A worker gone by the last evaluation is not read as shrinking, in its part or the sum.
    raw.memory_at[6] = {"aggregator": 90}
    gone = outcome.measure(raw, per_round=10, workers=2, target=0.9)
    assert gone["memory_growth_by_process"] == {"aggregator": -10}
    assert gone["memory_growth_bytes"] == -10
    assert [p["memory"] for p in got["curve"]] == [None, 100, None, None, None, 300, 350]
    assert got["refused_aggregates"] == 1 and got["evaluations"] == 6
    assert [p["x"] for p in got["curve"]] == [0, 1, 2, 3, 4, 5, 6]


def test_memory_growth_is_read_between_medians_at_each_end():
    """A process whose memory swings with what a round holds when read is not growing:
    the medians of GROWTH_WINDOW readings at each end are read, not one at each."""
    assert outcome.GROWTH_WINDOW == 5
    swing = [100, 100, 160, 100, 150, 100, 100, 100, 170, 100, 100, 100, 160]  # rounds 4-16
    grows = [200, 200, 200, 200, 200, 200, 200, 200, 210, 230, 230, 230, 230]
    raw = outcome.Raw(
        "finished", START, 30.0, history(*[0.5 + r / 100 for r in range(17)]),
        memory_at={r: {"aggregator": a, "worker-1": w}
                   for r, a, w in zip(range(4, 17), swing, grows, strict=True)},
    )  # fmt: skip

    got = outcome.measure(raw, per_round=10, workers=1, target=None)

    # Rounds 5-9 against 12-16: medians 100 and 100, 200 and 230 (round 5 against round 16
    # alone read the aggregator's +60).
    assert got["memory_growth_by_process"] == {"aggregator": 0, "worker-1": 30}
    assert got["memory_growth_bytes"] == 30
    # Fewer than twice the window: each end is half the readings (here rounds 5-6 and 7-8).
    raw.memory_at = {r: {"aggregator": m} for r, m in ((4, 1), (5, 10), (6, 20), (7, 40), (8, 50))}
    raw.entries = history(*[0.5] * 9)
    assert outcome.measure(raw, per_round=10, workers=1, target=None)["memory_growth_bytes"] == 30
    raw.memory_at = {r: {"aggregator": 10} for r in (1, 5)}  # one reading from round 5: none
    assert outcome.measure(raw, per_round=10, workers=1, target=None)["memory_growth_bytes"] is None


def test_a_process_missed_by_one_reading_keeps_its_growth_and_totals_are_read_alike():
    readings = {r: {"aggregator": 100, "worker-1": 200 + r} for r in range(5, 15)}
    del readings[6]["worker-1"]  # one `docker stats` that missed a container
    points = [
        outcome.Point(x=r, round=r, version=r, accuracy=0.9, loss=0.1, seconds=float(r),
                      memory=sum(m.values()), memory_by_process=m)
        for r, m in readings.items()
    ]  # fmt: skip

    got = outcome.growth(points)

    # worker-1: rounds 5, 7, 8, 9 (median 207.5) against 10-14 (212): +4.5, rounded to 4
    assert got["memory_growth_by_process"] == {"aggregator": 0, "worker-1": 4}
    assert got["memory_growth_bytes"] == 4
    for p in points:  # read as one total (a process tree, say): medians of the totals
        p.memory_by_process = None
    assert outcome.growth(points) == {"memory_growth_bytes": 5, "memory_growth_by_process": None}


def test_the_report_reads_growth_again_from_the_curves_of_runs_measured_before(sweep, tmp_path):
    e, results = sweep
    folder = tmp_path / "results"
    memory = dict(zip(range(5, 15), [100, 160, *[100] * 7, 160], strict=True))
    curve = [{"x": float(r), "round": r, "version": r, "accuracy": 0.9, "loss": 0.1,
              "seconds": float(r), "memory": m, "memory_by_process": {"aggregator": m}}
             for r, m in memory.items()]  # fmt: skip
    for r in results:
        cell = next(c for c in e.cells if c.number == r["cell"])
        run = folder / "runs" / cell.key("local", "rounds", 0.9) / f"seed-{r['seed']}"
        run.mkdir(parents=True)
        # as measured between single readings: round 5's 100 and round 14's 160
        old = {"memory_growth_bytes": 60, "memory_growth_by_process": {"aggregator": 60}}
        (run / "result.json").write_text(json.dumps(r | old | {"curve": curve}))

    got = report.collect(e, folder, "local")

    assert len(got) == len(results)
    assert all(r["memory_growth_bytes"] == 0 for r in got)
    assert all(r["memory_growth_by_process"] == {"aggregator": 0} for r in got)
    # A curve this version cannot read (its points lack fields) leaves the stored figures.
    for path in folder.glob("runs/*/seed-*/result.json"):
        result = json.loads(path.read_text())
        result["curve"] = [{"memory": 100}, {"memory": 160}]
        path.write_text(json.dumps(result))
    kept = report.collect(e, folder, "local")
    assert all(r["memory_growth_bytes"] == 60 for r in kept)
    assert all(r["memory_growth_by_process"] == {"aggregator": 60} for r in kept)


def test_a_virtual_clock_run_reports_simulated_seconds_to_each_target(sweep):
    entries = history(0.1, 0.8, 0.92, 0.91, 0.95)
    for e, sim in zip(entries, (0.0, 31.5, 60.25, 95.0, 120.5), strict=True):
        e["sim_seconds"] = sim
    raw = outcome.Raw("finished", START, 20.0, entries)

    got = outcome.measure(raw, per_round=10, workers=2, target=0.9, also=(0.95,))

    assert got["sim_seconds_to_target"] == 60.25  # round 2, the first at 0.9
    assert got["also"][0]["sim_seconds"] == 120.5
    e, results = sweep
    real = report.summary(e, results).split("## Cells")[1].split("## By")[0]
    assert "simulated" not in real  # the real clock's sim_seconds are wall seconds
    for r in results:
        r["sim_seconds_to_target"] = 100.0 + r["seed"]
        r["settings"] = {**r["settings"], "CLOCK": "virtual"}
    cells = report.summary(e, results).split("## Cells")[1].split("## By")[0]
    assert "simulated s to 90%" in cells.splitlines()[2]
    assert "102.0 ± 1.0 (3/3)" in cells  # seeds 1, 2, 3 of a cell that all reached it


def test_an_asynchronous_run_is_read_in_rounds_worth_of_updates():
    raw = outcome.Raw("target", START, 5.0, history(0.1, 0.5, 0.95, per_round=3))

    got = outcome.measure(raw, per_round=10, workers=1, target=0.9)

    assert [p["x"] for p in got["curve"]] == [0.0, 0.3, 0.6]
    assert got["rounds_to_target"] == 0.6 and got["status"] == "target"
    assert got["bytes_to_workers"] is None and got["memory_growth_bytes"] is None


def test_without_a_target_nothing_is_reached():
    got = outcome.measure(outcome.Raw("finished", START, 5.0, history(0.1, 0.99)), per_round=1,
                          workers=1, target=None)  # fmt: skip
    assert got["rounds_to_target"] is None and got["final_accuracy"] == 0.99
    assert got["rounds_to_target_interpolated"] is None


def points_at(*accuracies: float, step: float = 1.0) -> list[outcome.Point]:
    return [outcome.Point(x=round((i + 1) * step, 4), round=i + 1, version=i + 1, accuracy=a,
                          loss=0.1, seconds=None, memory=None)
            for i, a in enumerate(accuracies)]  # fmt: skip


def test_rounds_to_a_target_are_interpolated_on_the_best_accuracy_so_far():
    """As McMahan et al. read them: the curve of the best accuracy so far, crossed between
    the evaluation before and the one that reached the target."""
    # W2's seed 3 at 0.215: best so far 98.99% at round 19, 99.02% at round 20.
    assert outcome.crossing(points_at(*[0.98] * 18, 0.9899, 0.9902), 0.99) == 19.33
    # A dip after the best (rounds 2-3 below round 1's 0.985) starts from the best: from
    # round 3's x with round 1's accuracy, 3 + (0.99 - 0.985) / (0.995 - 0.985) = 3.5.
    assert outcome.crossing(points_at(0.985, 0.97, 0.98, 0.995), 0.99) == 3.5
    assert outcome.crossing(points_at(0.98, 0.99), 0.99) == 2.0  # reached exactly: its round
    assert outcome.crossing(points_at(0.995, 0.999), 0.99) == 1.0  # the first evaluation
    assert outcome.crossing(points_at(0.5, 0.98, 0.97), 0.99) is None
    # An asynchronous run's x, in rounds' worth of updates: 0.5 + 0.5 * (0.9 - 0.8) / 0.2
    assert outcome.crossing(points_at(0.8, 1.0, step=0.5), 0.9) == 0.75


def test_the_report_interpolates_rounds_to_the_target_of_runs_measured_before(sweep, tmp_path):
    e, results = sweep
    folder = tmp_path / "results"
    for r in results:
        r.pop("rounds_to_target_interpolated", None)  # as runs measured before it
        cell = next(c for c in e.cells if c.number == r["cell"])
        run = folder / "runs" / cell.key("local", e.stop, e.target) / f"seed-{r['seed']}"
        run.mkdir(parents=True)
        (run / "result.json").write_text(json.dumps(r))

    got = report.collect(e, folder, "local")

    # Each curve: accuracy final * x / 4 at rounds 1-4, so 0.9 is crossed between the
    # round before and the first at or above it (version 0 left out).
    for r in got:
        acc = [p["accuracy"] for p in r["curve"] if p["version"] > 0]
        hit = next((i for i, a in enumerate(acc) if a >= 0.9), None)
        if hit is None:
            assert "rounds_to_target_interpolated" not in r
        else:
            want = hit + (0.9 - acc[hit - 1]) / (acc[hit] - acc[hit - 1])  # round hit before
            assert r["rounds_to_target_interpolated"] == round(want, 2)
    assert any("rounds_to_target_interpolated" in r for r in got)
    cells = report.summary(e, got).split("## Cells")[1]
    assert "| rounds to 90% | rounds to 90%, interpolated | seconds to 90% |" in cells


def test_a_dp_run_reports_its_last_epsilon_and_the_summary_shows_it(sweep):
    entries = history(0.1, 0.8, 0.9)
    for e, eps in zip(entries, (0.0, 1.25, 2.5), strict=True):
        e |= {"epsilon": eps, "delta": 0.01}
    got = outcome.measure(outcome.Raw("finished", START, 5.0, entries), per_round=1,
                          workers=1, target=None)  # fmt: skip
    assert got["epsilon"] == 2.5
    # DP_NOISE=0: every round's ε is null (no bound); version 0's 0 is not the run's ε.
    for e, eps in zip(entries, (0.0, None, None), strict=True):
        e["epsilon"] = eps
    clipped = outcome.measure(outcome.Raw("finished", START, 5.0, entries), per_round=1,
                              workers=1, target=None)  # fmt: skip
    assert clipped["epsilon"] == math.inf
    plain = outcome.measure(outcome.Raw("finished", START, 5.0, history(0.1, 0.9)),
                            per_round=1, workers=1, target=None)  # fmt: skip
    assert plain["epsilon"] is None

    e, results = sweep
    assert "ε at DP_DELTA" not in report.summary(e, results)
    for r, eps in zip(results, (1.0, 2.0, 3.0), strict=False):
        r["epsilon"] = eps
    m, sd = independent_mean_sd([1.0, 2.0, 3.0])
    summary = report.summary(e, results)
    assert "ε at DP_DELTA" in summary and f"{m:.2f} ± {sd:.2f}" in summary
    for r in results:
        r["epsilon"] = math.inf
    assert "| ∞ |" in report.summary(e, results)


AGGREGATOR_METRICS = """\
fedsim_aggregation_seconds_sum 0.75
fedsim_aggregation_seconds_count 5.0
fedsim_checkpoint_seconds_sum 0.25
fedsim_checkpoint_seconds_count 2.0
fedsim_process_peak_resident_memory_bytes 2.5e+08
"""
NEW = ("aggregator_seconds_per_round", "aggregator_peak_memory_bytes", "status_bytes",
       "history_bytes")  # fmt: skip


def test_the_aggregators_own_time_memory_and_answers_are_read_from_what_it_left():
    raw = outcome.Raw(
        "finished", START, 5.0, history(0.1, 0.5, 0.6, 0.7, 0.8), metrics=AGGREGATOR_METRICS,
        status_bytes=5123, history_bytes=180,
    )  # fmt: skip

    got = outcome.measure(raw, per_round=10, workers=2, target=None)

    # (0.75 s making versions + 0.25 s writing checkpoints) over the history's 4 rounds
    assert got["aggregator_seconds_per_round"] == (0.75 + 0.25) / 4
    assert got["aggregator_peak_memory_bytes"] == 250_000_000
    assert (got["status_bytes"], got["history_bytes"]) == (5123, 180)
    # An aggregator without those metrics (or no /metrics answer): nothing, not zero.
    none = outcome.measure(dataclasses.replace(raw, metrics="", status_bytes=None,
                                               history_bytes=None),
                           per_round=10, workers=2, target=None)  # fmt: skip
    assert [none[k] for k in NEW] == [None, None, None, None]


def test_the_summary_shows_the_aggregators_own_time_and_memory_when_runs_report_them(sweep):
    e, results = sweep
    for r in results:
        r["aggregator_seconds_per_round"] = 0.010 + r["seed"] / 1000  # 11, 12, 13 ms
        r["aggregator_peak_memory_bytes"] = (200 + r["seed"]) * 2**20  # 201, 202, 203 MiB

    cells = report.summary(e, results).split("## Cells")[1].split("## By")[0]

    head, first = cells.splitlines()[2], cells.splitlines()[4]
    assert "aggregator ms / round" in head and "aggregator peak (MiB)" in head
    ms, sd = independent_mean_sd([11.0, 12.0, 13.0])
    mb, mb_sd = independent_mean_sd([201.0, 202.0, 203.0])
    assert f"| {ms:.1f} ± {sd:.1f} | {mb:.0f} ± {mb_sd:.0f} |" in first


def test_the_report_of_runs_made_before_those_figures_leaves_them_blank(sweep, tmp_path):
    e, results = sweep  # result.json files as older runs wrote them: none of NEW
    assert not any(k in r for r in results for k in NEW)
    folder = tmp_path / "results"
    for r in results:
        cell = next(c for c in e.cells if c.number == r["cell"])
        run = folder / "runs" / cell.key("local", "rounds", 0.9) / f"seed-{r['seed']}"
        run.mkdir(parents=True)
        (run / "result.json").write_text(json.dumps(r))

    report.write(e, report.collect(e, folder, "local"), folder)

    rows = list(csv.DictReader(io.StringIO((folder / "runs.csv").read_text())))
    assert len(rows) == len(results)
    assert all(row[k] == "" for row in rows for k in NEW)
    summary = (folder / "summary.md").read_text()
    assert "aggregator" not in summary  # the cells table as before
    assert f"{independent_mean_sd(FINAL[1])[0]:.2%}" in summary


# --- the progress line -------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_estimates_the_time_left_from_this_sessions_pace():
    clock, out = Clock(), io.StringIO()
    shown = progress.Progress(4, 40.0, out=out, clock=clock, tty=True)
    shown.skip(10.0)  # a run kept from before: done, but not part of the pace

    shown.begin("cell 2", 10.0)
    assert shown.left() is None
    clock.now += 50
    shown.entry(5.0)  # 5 rounds in 50 s: 10 s a round, 25 rounds left

    assert shown.left() == pytest.approx(250.0)
    assert "run 2/4 [#####-----] round 5/10 | sweep [####------] 38% | about 4m10s left" in (
        out.getvalue()
    )
    shown.end("final 91%")
    assert out.getvalue().endswith("run 2/4 final 91%\n")


def test_in_a_log_progress_prints_only_each_runs_start_and_outcome():
    out = io.StringIO()
    shown = progress.Progress(1, 5.0, out=out, clock=Clock(), tty=False)

    shown.begin("cell 1", 5.0)
    shown.entry(1.0)
    shown.end("final 90%")

    assert out.getvalue() == "run 1/1: cell 1\nrun 1/1 final 90%\n"


def test_durations_read_as_minutes_or_hours():
    assert [progress.duration(s) for s in (9, 71, 3725)] == ["9s", "1m11s", "1h02m"]


def test_a_run_stopped_by_a_diverged_training_says_why_and_a_budget_stop_does_not_count():
    from fedsim.aggregator.dropouts import STOPPED

    reason = "client-7's training in task r3.c7 on w1 diverged (non-finite weights in a)"
    log = (
        "10:00:01 INFO fedsim.aggregator: round 2: epsilon 3.100; stopping: DP_EPSILON_BUDGET=4\n"
        f"10:00:02 ERROR fedsim.aggregator: {STOPPED}{reason}\n"
    )
    raw = outcome.Raw("finished", START, 5.0, history(0.1, 0.5), aggregator_log=log)
    got = outcome.measure(raw, per_round=1, workers=1, target=None)
    assert got["stopped"] == reason
    budget = outcome.Raw(
        "finished", START, 5.0, history(0.1, 0.5), aggregator_log=log.splitlines()[0]
    )
    assert outcome.measure(budget, per_round=1, workers=1, target=None)["stopped"] is None


def test_memory_growth_by_process_is_a_csv_column_and_a_table_of_the_summary(sweep, tmp_path):
    e, results = sweep
    assert "Memory growth by process" not in report.summary(e, results)  # none sampled apart
    mib = 2**20
    results[0] |= {
        "memory_growth_bytes": 60 * mib,
        "memory_growth_by_process": {"aggregator": 5 * mib, "worker-1": 55 * mib},
    }
    results[1] |= {"memory_growth_bytes": -mib,
                   "memory_growth_by_process": {"aggregator": -mib, "worker-2": 0}}  # fmt: skip

    report.write_csv(e, results, tmp_path / "runs.csv")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "runs.csv").read_text())))
    summary = report.summary(e, results)

    assert rows[0]["memory_growth_by_process"] == f"aggregator={5 * mib} worker-1={55 * mib}"
    assert rows[2]["memory_growth_by_process"] == ""
    heading = "## Memory growth by process (MiB, from round 5 to the end, medians of up to 5"
    table = summary.split(heading + " readings at each end)")[1]
    table = table.split("## By")[0]  # the axes' tables follow
    lines = [line for line in table.strip().splitlines() if line.startswith("|")]
    assert (
        lines[0]
        == "| cell | AGGREGATION | EPOCHS | seed | all | aggregator | worker-1 | worker-2 |"
    )
    assert lines[2] == "| 1 | `fedavg` | `1` | 1 | +60.0 | +5.0 | +55.0 | - |"
    assert lines[3] == "| 1 | `fedavg` | `1` | 2 | -1.0 | -1.0 | - | +0.0 |"
    assert len(lines) == 4  # the runs that sampled their processes apart, no others
