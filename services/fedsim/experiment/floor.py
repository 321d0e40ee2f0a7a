"""The plain Keras floor: a FedAvg run's training in one process, with nothing federated around it.

    python -m fedsim.experiment.floor      (the keras engine starts it with a run's settings)

It trains what a fedsim run of the same settings trains, in one loop: the same
partition plan, the same seeded sample of CLIENTS_PER_ROUND clients each round,
each client's task from the same weights with the same seed and training
settings (the workers' own `Trainer`), FedAvg's sample-weighted mean
(w_{t+1} = sum_k n_k w_k / sum_k n_k, `strategies.aggregate.weighted_mean`), and
the test set scored after every round, as a fedsim run's evaluation tasks do.
No aggregator, HTTP, checkpoint or worker process; TensorFlow keeps its default
thread pools (every core). What a fedsim run takes beyond this process's
seconds is what the system adds: start-ups, HTTP, checkpoints, waiting.

It writes the history (MODEL_DIR/history.jsonl, one entry per round, as the
aggregator's) and the workers' log lines, so the experiment runner measures it
as it measures a federated run. Only FedAvg runs (fedprox too: its clients'
proximal term is the Trainer's, its aggregate FedAvg's); anything else is
refused with one line (`unsupported`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any

from fedsim.settings import ConfigError

STARTED = time.monotonic()  # before TensorFlow's import, which the floor's time includes

log = logging.getLogger("fedsim.floor")

RULES = ("fedavg", "fedprox")  # rules whose aggregate is the sample-weighted mean


def unsupported(settings: Any) -> ConfigError | None:
    """Why the floor cannot run these settings (naming the setting), or None when it can."""
    if settings.aggregation not in RULES:
        return ConfigError(
            "AGGREGATION",
            settings.aggregation,
            f"the keras engine runs {' and '.join(RULES)} only (the floor of a round rule)",
        )
    for key, value, plain in (
        ("ATTACK", settings.attack, "none"),
        ("DP", getattr(settings, "dp", "off"), "off"),
    ):
        if value != plain:
            return ConfigError(key, value, f"the keras engine trains with {key}={plain} only")
    return None


def _main() -> int:
    from fedsim import config

    settings = config.load()
    refused = unsupported(settings)
    if refused is not None:
        raise refused
    run(settings)
    return 0


def main() -> None:
    from fedsim import cli

    cli.setup_logging()
    sys.exit(cli.run("floor", _main))


def run(settings: Any) -> None:
    from fedsim import tfruntime

    tfruntime.quiet()
    import numpy as np

    from fedsim import models
    from fedsim.aggregator import strategies
    from fedsim.aggregator.strategies.aggregate import weighted_mean
    from fedsim.aggregator.tasks import ids
    from fedsim.client.training import Trainer
    from fedsim.data import partition

    trainer = Trainer(
        settings.data_dir, verify=settings.data_verify, model=settings.model, seed=settings.seed
    )
    parts = partition.make(partition.plan_settings(settings), trainer.labels)
    train = {
        "model": settings.model,
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate,
        "momentum": settings.momentum,
        "optimizer": settings.optimizer,
        **strategies.build(settings).client_settings(),  # as the queue's tasks carry them
    }
    history = settings.model_dir / "history.jsonl"
    history.parent.mkdir(parents=True, exist_ok=True)
    current = models.initial_weights(settings.model, settings.seed)
    trained = samples = 0  # updates and samples in the model so far, as the history counts
    for round_no in range(1, settings.rounds + 1):
        chosen = ids.sample(settings.seed, round_no, settings.per_round, len(parts))
        updates, counts = [], []
        for number in chosen:
            part = parts[number - 1]
            indices = part.indices
            if part.slices is not None:  # a slices client trains the next slice of its range
                first, last = part.slices
                slice_no = first + (round_no - 1) % (last - first + 1)
                indices = partition.slice_indices(part, slice_no, settings.num_images_train)
            task = ids.round_task(round_no, number)
            tensors, done = trainer.train(
                current, indices, train, ids.task_seed(settings.seed, task)
            )
            trained += 1
            log.info(
                "floor %s r%d train samples %d loss %.4f acc %.4f (%.1fs)",
                part.id,
                round_no,
                done.samples,
                done.loss,
                done.accuracy,
                done.seconds,
            )
            updates.append(tensors)
            counts.append(done.samples)
        current = {n: t.astype(np.float32) for n, t in weighted_mean(updates, counts).items()}
        samples += sum(counts)
        accuracy, loss, scored = trainer.evaluate(current)
        entry = {
            "version": round_no,
            "round": round_no,
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "accuracy": round(accuracy, 6),
            "loss": round(loss, 6),
            "samples": samples,
            "updates": trained,
            "clients": [ids.client_id(n) for n in chosen],
        }
        with history.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        log.info(
            "floor round %d: accuracy %.4f loss %.4f (scored in %.2fs)",
            round_no,
            accuracy,
            loss,
            scored,
        )
    log.info(
        "floor done: %d updates trained, 0 retries, %.1fs", trained, time.monotonic() - STARTED
    )


if __name__ == "__main__":
    main()
