"""prepare (data check and checkpoint version 0) and evaluate (accuracy report)."""

from __future__ import annotations

import json
import logging
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim import checkpoints, evaluate, models, prepare
from fedsim.aggregator import history
from fedsim.data import partition
from helpers import write_v0
from test_plots import png_size

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def env(monkeypatch, tmp_path, mnist_dir):
    """Point the commands at the test MNIST and a fresh MODEL_DIR; no .env is read."""
    monkeypatch.setenv("FEDSIM_ENV_FILE", str(tmp_path / "no.env"))
    monkeypatch.setenv("DATA_DIR", str(mnist_dir))
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    return monkeypatch


def test_prepare_writes_version_0_once(env, tmp_path, capsys):
    model_dir = tmp_path / "models"
    assert prepare._main() == 0
    first = checkpoints.path_for(model_dir, 0).read_bytes()
    checkpoint = checkpoints.load_newest(model_dir)
    assert checkpoint.version == 0
    assert checkpoint.metadata["model"] == "mlp" and checkpoint.metadata["samples"] == "0"
    assert checkpoint.metadata["strategy"] == "async-weighted"
    assert sorted(checkpoint.tensors) == sorted(name for name, _ in models.SHAPES["mlp"])
    saved = json.loads((model_dir / "settings.json").read_text())
    assert saved["MODEL_DIR"] == str(model_dir) and saved["SEED"] == 42

    # A second run leaves the checkpoint as it is.
    checkpoints.save(model_dir, 3, checkpoint.tensors, {"model": "mlp", "samples": 9}, keep=5)
    assert prepare._main() == 0
    assert checkpoints.versions(model_dir) == [3, 0]
    assert checkpoints.path_for(model_dir, 0).read_bytes() == first


def test_version_0_depends_only_on_the_seed(env, tmp_path):
    digests = {}
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        env.setenv("MODEL_DIR", str(tmp_path / name))
        env.setenv("SEED", seed)
        assert prepare._main() == 0
        digests[name] = checkpoints.load_newest(tmp_path / name).tensors["hidden1/kernel"]
    assert (digests["a"] == digests["b"]).all()
    assert not (digests["a"] == digests["c"]).all()


def test_prepare_refuses_a_checkpoint_of_another_model(env, tmp_path, capsys):
    assert prepare._main() == 0
    env.setenv("MODEL", "cnn")
    assert prepare.cli.run("prepare", prepare._main) == 2
    err = capsys.readouterr().err
    assert "MODEL='cnn'" in err and "docker compose down -v" in err and str(tmp_path) in err


def test_prepare_without_data_or_network_names_the_files(env, tmp_path, capsys):
    env.setenv("DATA_DIR", str(tmp_path / "empty"))
    env.setenv("MNIST_MIRRORS", "http://127.0.0.1:9/")  # nothing listens on the discard port
    assert prepare.cli.run("prepare", prepare._main) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0  # one line
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        assert name in err
    assert "t10k-labels-idx1-ubyte" in err and str(tmp_path / "empty") in err
    assert not checkpoints.versions(tmp_path / "models")


def test_prepare_writes_partitions_json_then_leaves_it(env, tmp_path, caplog):
    caplog.set_level("INFO")
    model_dir = tmp_path / "models"
    env.setenv("PARTITION", "shards")
    env.setenv("NUM_CLIENTS", "50")
    assert prepare._main() == 0
    content = partition.read(model_dir)
    assert content["settings"] == {
        "PARTITION": "shards",
        "SEED": 42,
        "NUM_CLIENTS": 50,
        "SHARDS_PER_CLIENT": 2,
    }
    assert [c["samples"] for c in content["clients"]] == [1200] * 50
    assert "plan: shards (2 per client), 50 clients of 1200 samples, " in caplog.text
    written = (model_dir / "partitions.json").read_bytes()

    caplog.clear()
    assert prepare._main() == 0
    assert "partitions.json matches the settings: left as it is" in caplog.text
    assert (model_dir / "partitions.json").read_bytes() == written


def test_prepare_default_plan_is_the_three_slice_ranges(env, tmp_path):
    assert prepare._main() == 0
    content = partition.read(tmp_path / "models")
    assert [(c["id"], c["slices"], c["samples"]) for c in content["clients"]] == [
        ("client-1", [1, 4], 20_000),
        ("client-2", [5, 8], 20_000),
        ("client-3", [9, 12], 20_000),
    ]


def test_prepare_refuses_settings_that_differ_from_partitions_json(env, tmp_path, capsys):
    model_dir = tmp_path / "models"
    assert prepare._main() == 0
    written = (model_dir / "partitions.json").read_bytes()
    capsys.readouterr()
    env.setenv("PARTITION", "iid")
    assert prepare.cli.run("prepare", prepare._main) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "PARTITION is iid here, slices in partitions.json" in err
    assert f"{model_dir / 'partitions.json'} was made with" in err
    assert "docker compose down -v" in err and "change it back" in err
    assert (model_dir / "partitions.json").read_bytes() == written


def test_prepare_refuses_a_corrupt_partitions_json(env, tmp_path, capsys):
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    (model_dir / "partitions.json").write_text("{")
    assert prepare.cli.run("prepare", prepare._main) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "partitions.json: not JSON" in err and "docker compose down -v" in err
    assert not checkpoints.versions(model_dir)


def test_prepare_and_evaluate_import_no_tensorflow(tmp_path, mnist_dir):
    # TensorFlow's start-up would be most of evaluate.sh's seconds; the scores are numpy's.
    code = (
        "import sys; from fedsim import {0}; code = {0}.cli.run('{0}', {0}._main);"
        " loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'));"
        " print('loaded:', loaded); sys.exit(code)"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "DATA_DIR": str(mnist_dir),
        "MODEL_DIR": str(tmp_path / "models"),
        "FEDSIM_ENV_FILE": str(tmp_path / "no.env"),
        "MODEL": "cnn",
    }
    for module in ("prepare", "evaluate"):
        result = subprocess.run(
            [sys.executable, "-c", code.format(module)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "loaded: []" in result.stdout
    assert "(version 0, 0 samples aggregated, cnn)" in result.stdout
    checkpoint = checkpoints.load_newest(tmp_path / "models")
    assert checkpoint.metadata["model"] == "cnn"
    for name, value in models.initial_weights("cnn", 42).items():
        assert (checkpoint.tensors[name] == value).all()


def test_evaluate_without_a_checkpoint_says_what_to_run(env, capsys):
    assert evaluate._main([]) == 1
    err = capsys.readouterr().err
    assert "no checkpoint in" in err
    assert "docker compose up" in err and "scripts/simulate.sh" in err


def test_evaluate_writes_a_json_report(env, tmp_path, capsys):
    assert prepare._main() == 0
    capsys.readouterr()
    report_path = tmp_path / "reports" / "eval.json"
    assert evaluate._main(["--json", str(report_path)]) == 0
    out = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert f"accuracy: {report['accuracy']:.4f}" in out
    assert "confusion matrix" in out and "per-class accuracy" in out
    assert report["version"] == 0 and report["model"] == "mlp" and report["samples"] == 0
    assert sum(map(sum, report["confusion"])) == 10_000
    assert set(report["per_class"]) == {str(d) for d in range(10)}
    assert report["loss"] > 0 and 0 <= report["accuracy"] <= 1
    assert report["settings"]["MODEL"] == "mlp"
    assert report["checkpoint"].endswith("ckpt-0.safetensors")


def test_score_by_hand():
    import numpy as np

    # Three images: a 0 predicted right, a 1 predicted right, a 1 predicted as 0.
    probabilities = np.zeros((3, 10), np.float32)
    probabilities[0, 0] = probabilities[1, 1] = 1.0
    probabilities[2, 0], probabilities[2, 1] = 0.5, 0.5
    probabilities[2, 0] += 0.01
    result = evaluate.score(probabilities, np.array([0, 1, 1]))
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["per_class"]["0"] == 1.0 and result["per_class"]["1"] == 0.5
    assert result["confusion"][1] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    assert result["loss"] == pytest.approx(-np.log(0.5) / 3, rel=1e-5)


def test_evaluate_sh_local_without_a_checkpoint(tmp_path, mnist_dir):
    result = subprocess.run(
        [str(ROOT / "scripts" / "evaluate.sh"), "--local"],
        env={
            "PATH": "/usr/bin:/bin",
            "DATA_DIR": str(mnist_dir),
            "MODEL_DIR": str(tmp_path / "models"),
            "FEDSIM_ENV_FILE": str(tmp_path / "no.env"),
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert "no checkpoint in" in result.stderr and "docker compose up" in result.stderr


def _history_entries(model_dir: Path) -> list[dict]:
    """Three evaluated rounds written as the aggregator writes them; round 2 is the best."""
    entries = [
        {
            "version": 2 * n,
            "round": n,
            "time": f"2026-01-01T00:0{n}:00+00:00",
            "accuracy": accuracy,
            "loss": loss,
            "samples": 3000 * n,
            "updates": 5 * n,
            "clients": [f"client-{n}", f"client-{n + 5}"],
        }
        for n, accuracy, loss in ((1, 0.8, 0.7), (2, 0.93, 0.25), (3, 0.91, 0.3))
    ]
    for entry in entries:
        history.append(model_dir, entry)
    return entries


def test_evaluate_reports_the_history_and_writes_plots(env, tmp_path, capsys):
    model_dir = tmp_path / "models"
    write_v0(model_dir)
    entries = _history_entries(model_dir)
    plan = {
        "format": 1,
        "settings": {"PARTITION": "shards", "SEED": 42, "NUM_CLIENTS": 20},
        "train_images": 60000,
        "clients": [
            {"id": f"client-{i}", "samples": 600, "labels": labels, "sha256": "0" * 64}
            for i in range(1, 21)
            for labels in ([300 if d in (i % 10, (i + 3) % 10) else 0 for d in range(10)],)
        ],
    }
    (model_dir / "partitions.json").write_text(json.dumps(plan))
    report_path = tmp_path / "reports" / "eval.json"

    assert evaluate._main(["--json", str(report_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    report = json.loads(report_path.read_text())
    at = out.index(f"loss: {report['loss']:.4f}")
    assert out[at - 1] == f"accuracy: {report['accuracy']:.4f}"
    assert out[at + 1] == (
        "history: 3 evaluations; best accuracy 0.9300 at round 2 (version 4); "
        "last 0.9100 at round 3 (version 6)"
    )
    assert report["history"] == entries
    sizes = {"learning-curve": (1000, 500), "confusion": (700, 600), "clients": (1200, 500)}
    for name, size in sizes.items():
        path = tmp_path / "reports" / f"eval-{name}.png"
        assert png_size(path) == size
        assert f"plot: {path}" in out
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == sorted(
        ["eval.json", *(f"eval-{name}.png" for name in sizes)]
    )


def test_evaluate_plots_without_history_or_partition_plan(env, tmp_path, capsys):
    model_dir, folder = tmp_path / "models", tmp_path / "pngs"
    write_v0(model_dir)
    assert evaluate._main(["--plots", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"history: none yet (no evaluated version in {model_dir / 'history.jsonl'})" in out
    assert "plot skipped: learning curve (no history yet)" in out
    assert f"plot skipped: clients (no partitions.json in {model_dir})" in out
    assert [p.name for p in folder.iterdir()] == ["evaluation-v0-confusion.png"]
    assert png_size(folder / "evaluation-v0-confusion.png") == (700, 600)
    assert not (tmp_path / "reports").exists()


def test_history_line_names_versions_when_there_are_no_rounds(tmp_path):
    entries = [
        {"version": 4, "round": None, "accuracy": 0.9, "loss": 0.3},
        {"version": 8, "round": None, "accuracy": 0.85, "loss": 0.4},
    ]
    assert evaluate.history_line(entries, tmp_path) == (
        "history: 2 evaluations; best accuracy 0.9000 at version 4; last 0.8500 at version 8"
    )
    assert evaluate.history_line(entries[:1], tmp_path) == (
        "history: 1 evaluation; best accuracy 0.9000 at version 4; last 0.9000 at version 4"
    )


def test_a_bad_partition_plan_skips_only_its_plot(tmp_path, capsys):
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    (model_dir / "partitions.json").write_text('{"clients": [{"id": "client-1", "labels": [1]}]}')
    report = {
        "version": 7,
        "model": "mlp",
        "accuracy": 0.5,
        "confusion": [[10 if t == p else 1 for p in range(10)] for t in range(10)],
        "history": _history_entries(model_dir),
    }
    written = evaluate.write_plots(report, model_dir, tmp_path / "out", "r")
    assert [p.name for p in written] == ["r-learning-curve.png", "r-confusion.png"]
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        f"fedsim evaluate: warning: clients plot skipped: {model_dir / 'partitions.json'}: "
        "partition manifest client 1 has no label histogram of 10 non-negative counts"
    )


def test_prepare_makes_a_tokens_file_others_could_read_owner_only(env, tmp_path, caplog):
    path = tmp_path / "secrets" / "tokens.json"
    env.setenv("TOKENS_FILE", str(path))
    assert prepare._main() == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # created so
    path.chmod(0o644)  # as an older version left it
    secret = path.read_text()

    with caplog.at_level(logging.INFO):
        assert prepare._main() == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == secret
    assert "made readable by its owner only" in caplog.text


# --- the population: clients.json ------------------------------------------------------


def test_prepare_writes_clients_json_beside_the_plan_then_leaves_it(env, tmp_path, caplog):
    from fedsim.data import population_file

    model_dir = tmp_path / "models"
    env.setenv("CLIENT_SPEED", "slow:0.5,4")
    env.setenv("DROPOUT", "0.2")
    with caplog.at_level(logging.INFO):
        assert prepare._main() == 0
    written = (model_dir / "clients.json").read_bytes()
    found = population_file.read(model_dir)
    assert [c.id for c in found.clients] == ["client-1", "client-2", "client-3"]
    assert sorted(c.speed for c in found.clients) == [1.0, 4.0, 4.0]  # 0.5 x 3 rounds up to 2
    assert "population: speed slow:0.5,4,1, bandwidth inf, dropout 0.2" in caplog.text
    assert prepare._main() == 0
    assert (model_dir / "clients.json").read_bytes() == written


def test_prepare_refuses_population_settings_that_differ_from_clients_json(env, tmp_path, capsys):
    model_dir = tmp_path / "models"
    assert prepare._main() == 0
    written = (model_dir / "clients.json").read_bytes()
    capsys.readouterr()
    env.setenv("DROPOUT", "0.1")
    assert prepare.cli.run("prepare", prepare._main) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "invalid setting DROPOUT='0.1'" in err
    assert "DROPOUT is 0.1 here, 0.0 in clients.json" in err and "docker compose down -v" in err
    assert (model_dir / "clients.json").read_bytes() == written


def test_prepare_refuses_an_edited_clients_json(env, tmp_path, capsys):
    model_dir = tmp_path / "models"
    assert prepare._main() == 0
    path = model_dir / "clients.json"
    path.write_text(path.read_text().replace('"speed": 1.0', '"speed": 9.0', 1))
    capsys.readouterr()
    assert prepare.cli.run("prepare", prepare._main) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert f"{path}: its content does not match its sha256" in err
    assert "docker compose down -v" in err


def test_prepare_names_the_line_of_a_bad_trace(env, tmp_path, capsys):
    trace = tmp_path / "trace.csv"
    trace.write_text("client,start,end\nclient-1,0,10\nclient-4,0,10\n")
    env.setenv("AVAILABILITY", f"trace:{trace}")
    assert prepare.cli.run("prepare", prepare._main) == 1
    err = capsys.readouterr().err.strip()
    assert f"{trace} line 3: 'client-4' is not one of the 3 logical clients" in err
    assert not (tmp_path / "models" / "clients.json").exists()
