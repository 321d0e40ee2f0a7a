"""The plain Keras floor: a FedAvg run's training in one process, with nothing federated around it.

    python -m fedsim.experiment.floor [--processes N]   (the keras engine starts it with a
                                                         run's settings)

It trains what a fedsim run of the same settings trains, in one loop: the same
partition plan, the same seeded sample of CLIENTS_PER_ROUND clients each round,
each client's task from the same weights with the same seed and training
settings (the workers' own `Trainer`), FedAvg's sample-weighted mean
(w_{t+1} = sum_k n_k w_k / sum_k n_k, `strategies.aggregate.weighted_mean`), and
the test set scored after every round, as a fedsim run's evaluation tasks do.
No aggregator, HTTP, checkpoint or worker process; TensorFlow keeps its default
thread pools (every core). What a fedsim run takes beyond this process's
seconds is what the system adds: start-ups, HTTP, checkpoints, waiting.

With `--processes N` (an experiment's `floor_processes`) N plain processes share
each round's clients, each with a TensorFlow thread pool of its share of the
cores, as fedsim's N workers do; a round's score is computed by one of them
while the next round trains, and this process only deals the tasks out and
averages. On 2 cores, 2 processes are the floor a 2-worker run is held to.

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


def _main(argv: list[str] | None = None) -> int:
    import argparse

    from fedsim import config

    parser = argparse.ArgumentParser(prog="python -m fedsim.experiment.floor")
    parser.add_argument(
        "--processes", type=int, default=1, help="plain processes sharing the clients"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.processes <= 64:
        parser.error(f"--processes must be 1 to 64, got {args.processes}")
    settings = config.load()
    refused = unsupported(settings)
    if refused is not None:
        raise refused
    run(settings, args.processes)
    return 0


def main() -> None:
    from fedsim import cli

    cli.setup_logging()
    sys.exit(cli.run("floor", _main))


def run(settings: Any, processes: int = 1) -> None:
    from fedsim import tfruntime

    tfruntime.quiet()
    import numpy as np

    from fedsim import models
    from fedsim.aggregator import strategies
    from fedsim.aggregator.strategies.aggregate import weighted_mean
    from fedsim.aggregator.tasks import ids
    from fedsim.data import partition
    from fedsim.protocol.tasks import training_json

    trainers = _Trainers(settings, processes)
    parts = partition.make(partition.plan_settings(settings), trainers.labels())
    # What the queue's tasks carry (aggregator/restore.py).
    train = training_json(settings, strategies.build(settings).client_settings())
    history = settings.model_dir / "history.jsonl"
    history.parent.mkdir(parents=True, exist_ok=True)
    current = models.initial_weights(settings.model, settings.seed)
    trained = samples = 0  # updates and samples in the model so far, as the history counts
    scoring = None  # the last round's score, computed while the next round trains
    for round_no in range(1, settings.rounds + 1):
        chosen = ids.sample(settings.seed, round_no, settings.per_round, len(parts))
        jobs = []
        for number in chosen:
            part = parts[number - 1]
            indices = part.indices
            if part.slices is not None:  # a slices client trains the next slice of its range
                first, last = part.slices
                slice_no = first + (round_no - 1) % (last - first + 1)
                indices = partition.slice_indices(part, slice_no, settings.num_images_train)
            seed = ids.task_seed(settings.seed, ids.round_task(round_no, number))
            jobs.append((part.id, trainers.train(current, indices, train, seed)))
        updates, counts = [], []
        for client, job in jobs:
            tensors, done = job.result()
            trained += 1
            log.info(
                "floor %s r%d train samples %d loss %.4f acc %.4f (%.1fs)",
                client,
                round_no,
                done.samples,
                done.loss,
                done.accuracy,
                done.seconds,
            )
            updates.append(tensors)
            counts.append(done.samples)
        if scoring is not None:
            _record(history, *scoring)
        current = {n: t.astype(np.float32) for n, t in weighted_mean(updates, counts).items()}
        samples += sum(counts)
        entry = {
            "version": round_no,
            "round": round_no,
            "samples": samples,
            "updates": trained,
            "clients": [ids.client_id(n) for n in chosen],
        }
        scoring = (entry, trainers.evaluate(current))
        if processes == 1:  # one process scores before the next round, as it always did
            _record(history, *scoring)
            scoring = None
    if scoring is not None:
        _record(history, *scoring)
    trainers.close()
    log.info(
        "floor done: %d updates trained, 0 retries, %.1fs", trained, time.monotonic() - STARTED
    )


def _record(history: Any, entry: dict[str, Any], job: Any) -> None:
    """Append a round's history entry, timed when its score came in, as the aggregator's
    (a pool's score may be read a round later: its time is still the score's)."""
    accuracy, loss, scored, at = job.result()
    entry = {
        "version": entry["version"],
        "round": entry["round"],
        "time": at,
        "accuracy": round(accuracy, 6),
        "loss": round(loss, 6),
        **{k: entry[k] for k in ("samples", "updates", "clients")},
    }
    with history.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    log.info(
        "floor round %d: accuracy %.4f loss %.4f (scored in %.2fs)",
        entry["round"],
        accuracy,
        loss,
        scored,
    )


class _Done:
    """A result already computed, answering as a future does."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value


class _Trainers:
    """The Trainer in this process, or one in each of `processes` spawned processes."""

    def __init__(self, settings: Any, processes: int) -> None:
        args = (str(settings.data_dir), settings.data_verify, settings.model, settings.seed)
        self.settings = settings
        self.pool = None
        if processes == 1:
            _start(*args, threads=0)
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from fedsim import tfruntime

        # Spawned: this process never starts TensorFlow, so there is nothing to fork.
        self.pool = ProcessPoolExecutor(
            processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start,
            initargs=(*args, tfruntime.threads_for(0, processes)),
        )

    def labels(self) -> Any:
        """The training set's labels, which the partition plan is made from: the Trainer's
        here, or read alone where the pool's processes hold the images."""
        if self.pool is None:
            return _trainer.labels
        from fedsim.data import mnist

        return mnist.load_file(
            self.settings.data_dir, "train-labels", verify=self.settings.data_verify
        )

    def train(self, *args: Any) -> Any:
        return self.pool.submit(_train, *args) if self.pool else _Done(_train(*args))

    def evaluate(self, tensors: Any) -> Any:
        return self.pool.submit(_evaluate, tensors) if self.pool else _Done(_evaluate(tensors))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


_trainer: Any = None  # this process's Trainer (_start)


def _start(data_dir: str, verify: bool, model: str, seed: int, threads: int) -> None:
    global _trainer
    from pathlib import Path

    from fedsim import tfruntime
    from fedsim.client.training import Trainer

    if threads:  # a process of a pool: its share of the cores (0: TensorFlow's default)
        tfruntime.configure(threads)
    _trainer = Trainer(Path(data_dir), verify=verify, model=model, seed=seed)


def _train(*args: Any) -> Any:
    return _trainer.train(*args)


def _evaluate(tensors: Any) -> Any:
    """(accuracy, loss, seconds, when it finished as the history's ISO time)."""
    return (*_trainer.evaluate(tensors), datetime.now(UTC).isoformat(timespec="milliseconds"))


if __name__ == "__main__":
    main()
