"""End to end without Docker: scripts/simulate.sh with 3 clients, then scripts/evaluate.sh."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from fedsim import checkpoints

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_three_clients_train_a_model_above_90_percent(tmp_path, mnist_dir):
    model_dir = tmp_path / "models"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "FEDSIM_ENV_FILE": str(tmp_path / "no.env"),
        "DATA_DIR": str(mnist_dir),
        "MODEL_DIR": str(model_dir),
        "AGGREGATOR_URL": f"http://127.0.0.1:{free_port()}",
        "MODEL": "mlp",
        # 3 x 2 slices of 3,000 images: 18,000 training images in all.
        "NUM_IMAGES_TRAIN": "3000",
        "CLIENT_SLICES": "1-2 3-4 5-6",
        "EPOCHS": "2",
        "MAX_WAIT": "0.5",
    }
    run = subprocess.run(
        [str(ROOT / "scripts" / "simulate.sh"), "--clients", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    out = run.stdout
    assert run.returncode == 0, out + run.stderr
    assert "Traceback" not in out + run.stderr

    # Every process's lines carry its name; every client finished with a summary.
    summaries = re.findall(
        r"^(client-\d) +\| .* done: .*pushes (\d+) accepted (\d+) failed", out, re.M
    )
    assert sorted(name for name, _, _ in summaries) == ["client-1", "client-2", "client-3"]
    assert re.search(r"^client-2 +\| .*client-2: slices 3-4 \(samples 6000-11999\)$", out, re.M)
    assert re.search(r"^aggregator +\| ", out, re.M)
    accepted = sum(int(a) for _, a, _ in summaries)
    assert accepted == 6 and all(f == "0" for _, _, f in summaries)

    # The final checkpoint holds every accepted update, each counted once.
    final = checkpoints.load_newest(model_dir)
    assert final.version == accepted
    assert int(final.metadata["samples"]) == 6 * 3000

    report_path = tmp_path / "report.json"
    evaluation = subprocess.run(
        [str(ROOT / "scripts" / "evaluate.sh"), "--local", "--json", str(report_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert evaluation.returncode == 0, evaluation.stderr
    report = json.loads(report_path.read_text())
    assert f"accuracy: {report['accuracy']:.4f}" in evaluation.stdout
    assert report["version"] == accepted
    assert report["accuracy"] >= 0.90
