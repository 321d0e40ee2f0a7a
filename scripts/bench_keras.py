#!/usr/bin/env python3
"""Plain Keras baselines: the training of a federated workload in one process, timed.

    scripts/bench_keras.py w1          Flower's W1: 3 clients on slices 1-4/5-8/9-12, mlp,
                                       adam 0.001, 1 epoch of one 5,000-image slice per
                                       client per round, batch 32, 4 FedAvg rounds
    scripts/bench_keras.py w2          McMahan's CNN round: 10 clients x 5 epochs x 600 images,
                                       batch 10, sgd (momentum 0.9), 3 rounds
    scripts/bench_keras.py w2 --rounds 5 --lr 0.02 --json out.json

No aggregator, no HTTP, no worker processes: one process with TensorFlow's
default thread pools (all cores), the model from `fedsim.models.build`, and
FedAvg (McMahan et al. 2017) as a sample-weighted mean of the clients' weights
in numpy. Each client starts from a fresh optimizer state (its variables
zeroed, as the workers do), so the work is the same as in a federated run; what
it leaves out is what the system adds: processes, HTTP, checkpoints and the
per-round test evaluation. It prints one JSON document (scripts/benchlib) whose
results are the time from process start (TensorFlow's import included) to the
end, the seconds of each round and the final test accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

STARTED = time.monotonic()  # before TensorFlow's import, which the process time includes

from benchlib import Bench, add_arguments, data_dir  # noqa: E402

# name -> the workload's settings (see the module docstring).
WORKLOADS = {
    "w1": {
        "model": "mlp",
        "optimizer": "adam",
        "lr": 0.001,
        "epochs": 1,
        "batch": 32,
        "rounds": 4,
    },
    "w2": {
        "model": "cnn",
        "optimizer": "sgd",
        "lr": 0.02,
        "epochs": 5,
        "batch": 10,
        "rounds": 3,
    },
}
W1_SLICES = ((1, 4), (5, 8), (9, 12))  # the default CLIENT_SLICES
SLICE_IMAGES = 5000  # NUM_IMAGES_TRAIN's default
W2_CLIENTS, W2_SAMPLES = 10, 600  # C x K = 0.1 x 100 clients of 600 images


def client_indices(workload: str, round_no: int, seed: int) -> list:
    """Per client of the round, the training indices it trains on."""
    import numpy as np

    if workload == "w1":
        # Under fedavg a slices client trains the next slice of its range each round.
        starts = [first + (round_no - 1) % (last - first + 1) for first, last in W1_SLICES]
        return [np.arange((s - 1) * SLICE_IMAGES, s * SLICE_IMAGES) for s in starts]
    # IID: 10 random clients of 600 images each, a fresh draw per round.
    rng = np.random.default_rng([seed, round_no])
    order = rng.permutation(60_000)
    return [order[i * W2_SAMPLES : (i + 1) * W2_SAMPLES] for i in range(W2_CLIENTS)]


def run(workload: str, settings: dict, seed: int, bench: Bench) -> dict:
    from fedsim import tfruntime

    tfruntime.quiet()  # the same kernels as the workers (oneDNN off), default thread pools
    import keras
    import numpy as np

    from fedsim import models
    from fedsim.client.training import fresh_optimizer
    from fedsim.data import mnist

    folder = Path(data_dir())
    images, labels = mnist.load_pair(folder, "train", verify=False)
    test_x, test_y = mnist.load_pair(folder, "t10k", verify=False)
    model = models.build(
        settings["model"], seed=seed, learning_rate=settings["lr"], optimizer=settings["optimizer"]
    )
    global_weights = models.get_weights(model)
    round_seconds = []
    for round_no in range(1, settings["rounds"] + 1):
        started = time.monotonic()
        updates, sizes = [], []
        for client, indices in enumerate(client_indices(workload, round_no, seed)):
            models.set_weights(model, global_weights)
            fresh_optimizer(model.optimizer, settings["lr"])
            keras.utils.set_random_seed(seed + 1000 * round_no + client)
            model.fit(
                mnist.scale(images[indices]),
                labels[indices].astype(np.int64),
                epochs=settings["epochs"],
                batch_size=settings["batch"],
                shuffle=True,
                verbose=0,
            )
            updates.append(models.get_weights(model))
            sizes.append(len(indices))
        total = sum(sizes)
        global_weights = {
            name: sum(u[name] * (n / total) for u, n in zip(updates, sizes, strict=True)).astype(
                np.float32
            )
            for name in global_weights
        }
        round_seconds.append(time.monotonic() - started)
    models.set_weights(model, global_weights)
    _, accuracy = model.evaluate(
        mnist.scale(test_x), test_y.astype(np.int64), batch_size=1000, verbose=0
    )
    return bench.figure(
        {
            "workload": workload,
            "settings": settings,
            "round_seconds": [round(s, 2) for s in round_seconds],
            "train_seconds": round(sum(round_seconds), 2),
            "accuracy": round(float(accuracy), 4),
            "process_seconds": round(time.monotonic() - STARTED, 2),
            "cpu_count": os.cpu_count(),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("--rounds", type=int, help="FedAvg rounds (default: the workload's)")
    parser.add_argument("--lr", type=float, help="learning rate (default: the workload's)")
    parser.add_argument("--seed", type=int, default=42)
    add_arguments(parser, json_help="also write the result here")
    args = parser.parse_args()
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.lr is not None and not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    settings = dict(WORKLOADS[args.workload])
    if args.rounds is not None:
        settings["rounds"] = args.rounds
    if args.lr is not None:
        settings["lr"] = args.lr
    bench = Bench.from_args("bench_keras", args)
    print(json.dumps(bench.finish(run(args.workload, settings, args.seed, bench))), flush=True)


if __name__ == "__main__":
    main()
