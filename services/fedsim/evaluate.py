"""`python -m fedsim.evaluate [--checkpoint PATH] [--json FILE]`: score a checkpoint.

Scores the newest checkpoint in MODEL_DIR (or the one given) on MNIST's 10,000
test images: accuracy, loss, per-class accuracy and the confusion matrix.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fedsim import checkpoints, cli, config, models, weights
from fedsim.client.training import quiet_tensorflow
from fedsim.data import mnist


def model_name(checkpoint: checkpoints.Checkpoint, fallback: str) -> str:
    """The checkpoint's model: its metadata, else the layout it matches, else MODEL."""
    name = checkpoint.metadata.get("model")
    if name in models.SHAPES:
        return name
    layout = sorted(weights.layout_of(checkpoint.tensors))
    for candidate, shapes in models.SHAPES.items():
        if sorted(shapes) == layout:
            return candidate
    return fallback


def score(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Accuracy, cross-entropy loss, per-class accuracy and confusion from predictions."""
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    picked = probabilities[np.arange(len(labels)), labels]
    loss = float(-np.log(np.clip(picked, 1e-7, 1.0)).mean())
    totals = confusion.sum(axis=1)
    per_class = {
        str(digit): float(confusion[digit, digit] / totals[digit]) if totals[digit] else 0.0
        for digit in range(10)
    }
    return {
        "accuracy": float((predicted == labels).mean()),
        "loss": loss,
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "test_images": len(labels),
    }


def render(report: dict[str, Any]) -> str:
    lines = [
        f"checkpoint: {report['checkpoint']} (version {report['version']}, "
        f"{report['samples']} samples aggregated, {report['model']})",
        f"accuracy: {report['accuracy']:.4f}",
        f"loss: {report['loss']:.4f}",
        "per-class accuracy:",
        "  " + "  ".join(f"{d}: {a:.4f}" for d, a in list(report["per_class"].items())[:5]),
        "  " + "  ".join(f"{d}: {a:.4f}" for d, a in list(report["per_class"].items())[5:]),
        "confusion matrix (rows: true digit, columns: predicted):",
        "      " + "".join(f"{d:>6}" for d in range(10)),
    ]
    for digit, row in enumerate(report["confusion"]):
        lines.append(f"  {digit:>3} " + "".join(f"{n:>6}" for n in row))
    return "\n".join(lines)


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fedsim.evaluate",
        description="Score a checkpoint on MNIST's 10,000 test images.",
    )
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint file (default: the newest)")
    parser.add_argument("--json", type=Path, help="also write the report to this JSON file")
    return parser.parse_args(argv)


def _main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    settings = config.load()
    if args.checkpoint is not None:
        if not args.checkpoint.is_file():
            print(f"fedsim evaluate: error: no checkpoint file {args.checkpoint}", file=sys.stderr)
            return 1
        checkpoint = checkpoints.read(args.checkpoint)
    else:
        checkpoint = checkpoints.load_newest(settings.model_dir)
        if checkpoint is None:
            print(
                f"fedsim evaluate: error: no checkpoint in {settings.model_dir}: train first "
                "with 'docker compose up --build --scale client=3' "
                "(or 'scripts/simulate.sh --clients 3' without Docker)",
                file=sys.stderr,
            )
            return 1
    images, labels = mnist.load_pair(settings.data_dir, "t10k", verify=settings.data_verify)

    name = model_name(checkpoint, settings.model)
    quiet_tensorflow()
    model = models.build(
        name, seed=settings.seed, learning_rate=settings.learning_rate
    )  # no training
    weights.validate(checkpoint.tensors, models.SHAPES[name])
    models.set_weights(model, checkpoint.tensors)
    probabilities = model.predict(mnist.scale(images), batch_size=1000, verbose=0)

    report = score(np.asarray(probabilities), labels.astype(np.int64))
    report.update(
        checkpoint=str(checkpoint.path),
        version=checkpoint.version,
        samples=int(float(checkpoint.metadata.get("samples", 0))),
        model=name,
    )
    saved = checkpoint.path.parent / "settings.json"
    if saved.is_file():
        report["settings"] = json.loads(saved.read_text())
    print(render(report), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report: {args.json}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> None:
    sys.exit(cli.run("evaluate", lambda: _main(argv)))


if __name__ == "__main__":
    main()
