"""prepare (data check and checkpoint version 0) and evaluate (accuracy report)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from fedsim import checkpoints, evaluate, models, prepare

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
