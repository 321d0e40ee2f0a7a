"""`python -m fedsim.evaluate [--checkpoint PATH] [--json FILE] [--plots DIR]`: score a checkpoint.

Scores the newest checkpoint in MODEL_DIR (or the one given) on MNIST's 10,000
test images: accuracy, loss, per-class accuracy and the confusion matrix; adds
the run's history (test accuracy per evaluated round or version, from the
checkpoint's folder) with its best and last entries. With `--json FILE` the
report goes to FILE and PNGs beside it (`<stem>-learning-curve.png`,
`<stem>-confusion.png`, `<stem>-clients.png`); `--plots DIR` puts the PNGs in
DIR instead. matplotlib is imported only when plots are written.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedsim import checkpoints, cli, config, forward, models, weights
from fedsim.aggregator import history
from fedsim.data import mnist


def model_name(checkpoint: checkpoints.Checkpoint, fallback: str) -> str:
    """The checkpoint's model: its metadata, else the layout it matches, else MODEL."""
    name = checkpoint.metadata.get("model")
    if name in models.SHAPES:
        return name
    layout = sorted(weights.layout_of(checkpoints.split(checkpoint.tensors)[0]))
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


def _when(entry: Mapping[str, Any]) -> str:
    if isinstance(entry.get("round"), int):
        return f"round {entry['round']} (version {entry['version']})"
    return f"version {entry['version']}"


def history_line(entries: list[dict[str, Any]], model_dir: Path) -> str:
    """One line: how many evaluations, the best and the last accuracy with their round."""
    if not entries:
        return f"history: none yet (no evaluated version in {history.path_in(model_dir)})"
    best, last = history.best_and_last(entries)
    count = f"{len(entries)} evaluation{'' if len(entries) == 1 else 's'}"
    return (
        f"history: {count}; best accuracy {best['accuracy']:.4f} at {_when(best)}; "
        f"last {last['accuracy']:.4f} at {_when(last)}"
    )


def privacy_of(entries: list[dict[str, Any]], version: int) -> dict[str, Any] | None:
    """Differential privacy's epsilon at delta for `version`, from the newest history entry up to
    it (None when the run has no DP); epsilon None is no bound (DP_NOISE=0)."""
    kept = [e for e in entries if "epsilon" in e and e["version"] <= version]
    if not kept:
        return None
    last = kept[-1]
    return {k: last.get(k) for k in ("epsilon", "delta", "round", "version")}


def privacy_line(dp: Mapping[str, Any]) -> str:
    eps = "∞" if dp["epsilon"] is None else f"{dp['epsilon']:.3f}"
    return f"privacy: ε = {eps} at δ = {dp['delta']:.3g} after {_when(dp)}"


def render(report: dict[str, Any]) -> str:
    lines = [
        f"checkpoint: {report['checkpoint']} (version {report['version']}, "
        f"{report['samples']} samples aggregated, {report['model']})",
        f"accuracy: {report['accuracy']:.4f}",
        f"loss: {report['loss']:.4f}",
    ]
    if "history" in report:
        lines.append(history_line(report["history"], Path(report["checkpoint"]).parent))
    if report.get("privacy"):
        lines.append(privacy_line(report["privacy"]))
    lines += [
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
    parser.add_argument(
        "--json", type=Path, help="also write the report to this JSON file, and PNGs beside it"
    )
    parser.add_argument(
        "--plots", type=Path, metavar="DIR", help="write the PNGs to this folder instead"
    )
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
    tensors = checkpoints.split(checkpoint.tensors)[0]  # not the rule's server state
    weights.validate(tensors, models.SHAPES[name])
    probabilities = forward.predict(name, tensors, images)  # numpy: no TensorFlow start-up

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
    report["history"] = history.read(checkpoint.path.parent)
    report["privacy"] = privacy_of(report["history"], checkpoint.version)
    print(render(report), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report: {args.json}", flush=True)
    if args.plots is not None or args.json is not None:
        folder = args.plots if args.plots is not None else args.json.parent
        stem = args.json.stem if args.json is not None else f"evaluation-v{checkpoint.version}"
        write_plots(report, checkpoint.path.parent, folder, stem)
    return 0


def _setting_list(settings: Mapping[str, Any], names: tuple[str, ...]) -> str:
    return ", ".join(f"{n}={settings[n]}" for n in names if settings.get(n) not in (None, ""))


def _partition_names(settings: Mapping[str, Any]) -> tuple[str, ...]:
    extra = {
        "slices": ("CLIENT_SLICES", "NUM_IMAGES_TRAIN"),
        "iid": ("NUM_CLIENTS",),
        "shards": ("SHARDS_PER_CLIENT",),
        "dirichlet": ("DIRICHLET_ALPHA",),
    }
    return ("PARTITION", *extra.get(str(settings.get("PARTITION")), ()), "SEED")


def _clients_title(manifest: object) -> str:
    manifest = manifest if isinstance(manifest, dict) else {}
    clients, plan = manifest.get("clients"), manifest.get("settings")
    plan = plan if isinstance(plan, dict) else {}
    count = len(clients) if isinstance(clients, list) else 0
    return f"Label distribution of {count} logical clients: " + _setting_list(
        plan, _partition_names(plan)
    )


def write_plots(report: dict[str, Any], model_dir: Path, folder: Path, stem: str) -> list[Path]:
    """The report's PNGs in `folder`, one line printed per file; returns the files written.

    The learning curve needs a history entry and the clients' label
    distribution needs `partitions.json` in `model_dir`; each is skipped with a
    line saying why when its input is missing.
    """
    from fedsim import plots  # matplotlib loads only when plots are asked for

    written: list[Path] = []

    def done(path: Path) -> None:
        written.append(path)
        print(f"plot: {path}", flush=True)

    if report["history"]:
        run = {**(report.get("settings") or {}), "MODEL": report["model"]}
        title = "Learning curve: " + _setting_list(run, ("MODEL", "AGGREGATION", "PARTITION"))
        done(plots.learning_curve(report["history"], folder / f"{stem}-learning-curve.png", title))
    else:
        print("plot skipped: learning curve (no history yet)", flush=True)

    title = (
        f"Confusion matrix: version {report['version']} ({report['model']}), "
        f"accuracy {report['accuracy']:.4f}"
    )
    done(plots.confusion_heatmap(report["confusion"], folder / f"{stem}-confusion.png", title))

    manifest_path = model_dir / "partitions.json"
    if not manifest_path.is_file():
        print(f"plot skipped: clients (no partitions.json in {model_dir})", flush=True)
        return written
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        path = folder / f"{stem}-clients.png"
        done(plots.label_distribution(manifest, path, _clients_title(manifest)))
    except (OSError, ValueError) as exc:  # a bad plan spoils only its own plot
        print(
            f"fedsim evaluate: warning: clients plot skipped: {manifest_path}: {exc}",
            file=sys.stderr,
            flush=True,
        )
    return written


def main(argv: list[str] | None = None) -> None:
    sys.exit(cli.run("evaluate", lambda: _main(argv)))


if __name__ == "__main__":
    main()
