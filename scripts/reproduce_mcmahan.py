#!/usr/bin/env python3
"""McMahan et al. 2017's MNIST experiment on fedsim: rounds of FedAvg to a target test accuracy.

    scripts/reproduce_mcmahan.py                        every cell, 2 workers
    scripts/reproduce_mcmahan.py --cells mlp-iid --max-rounds 150
    scripts/reproduce_mcmahan.py --sweep 0.005,0.01,0.02 --sweep-rounds 5
                                                        learning rates on cnn-iid, 5 rounds each
    scripts/reproduce_mcmahan.py --w2                   cnn-iid to 99% with time per round
                                                        beside plain Keras, and memory

"Communication-Efficient Learning of Deep Networks from Decentralized Data"
(McMahan, Moore, Ramage, Hampson, Aguera y Arcas; AISTATS 2017,
arXiv:1602.05629): K = 100 clients, a fraction C = 0.1 of them per round
(CLIENTS_PER_ROUND=10), FedAvg; the 2NN (MODEL=mlp) to 97% test accuracy with
E = 1 local epoch and minibatches of B = 10, the CNN to 99% with E = 5, B = 10;
IID (PARTITION=iid, 100 x 600 images) and pathological non-IID
(PARTITION=shards: 200 label-sorted shards of 300, 2 per client). Their Table 1
gives the rounds these took.

Each cell is one `scripts/simulate.sh --clients N` run with a fresh MODEL_DIR
and ROUNDS=--max-rounds. The script polls MODEL_DIR/history.jsonl (one test
evaluation per round) and stops the run's process group as soon as a round
reaches the target. Seconds per round are the mean time between the arrivals of
consecutive rounds' evaluations (round 1 onwards, so TensorFlow's start-up is
not in it); memory is the sum of the resident memory of every process of the
run (aggregator and workers), sampled every half second.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass, field

from benchlib import Bench, add_arguments, child_json, key_values, local_run, stop


@dataclass(frozen=True)
class Cell:
    model: str
    partition: str
    epochs: int
    batch: int
    target: float
    paper_rounds: int  # McMahan et al. 2017, Table 1 (FedAvg, C = 0.1)


CELLS = {
    "cnn-iid": Cell("cnn", "iid", 5, 10, 0.99, 20),
    "cnn-shards": Cell("cnn", "shards", 5, 10, 0.99, 229),
    "mlp-iid": Cell("mlp", "iid", 1, 10, 0.97, 87),
    "mlp-shards": Cell("mlp", "shards", 1, 10, 0.97, 664),
}
# Learning rates for SGD with momentum 0.9 (OPTIMIZER=sgd), chosen with --sweep:
# the best test accuracy after 5 rounds of the IID cell, per model (cnn: 0.02 over
# 0.01; mlp: 0.05 just over 0.02 and well over 0.01).
DEFAULT_LR = {"cnn": 0.02, "mlp": 0.05}
ADAM_LR = 0.001


@dataclass
class Outcome:
    cell: str
    lr: float
    optimizer: str
    workers: int
    max_rounds: int
    reached_round: int | None = None  # first round at or above the target
    rounds_run: int = 0
    accuracy: list[float] = field(default_factory=list)  # per round, round 1 first
    round_seconds: float | None = None
    wall_seconds: float = 0.0
    peak_rss_bytes: int = 0
    rss_at_round: dict[int, int] = field(default_factory=dict)
    load_before: float = 0.0
    load_after: float = 0.0
    stopped: str = ""  # target, rounds, time limit


def run_cell(
    name: str,
    args: argparse.Namespace,
    extra: dict[str, str],
    *,
    lr: float,
    max_rounds: int,
    stop_at_target: bool = True,
) -> Outcome:
    """One cell with the command line's optimizer, workers and time limit, and `extra`."""
    optimizer, workers, max_seconds = args.optimizer, args.workers, args.max_seconds
    cell = CELLS[name]
    out = Outcome(name, lr, optimizer, workers, max_rounds, load_before=os.getloadavg()[0])
    settings = {
        "MODEL": cell.model,
        "PARTITION": cell.partition,
        "NUM_CLIENTS": "100",
        "SHARDS_PER_CLIENT": "2",
        "CLIENTS_PER_ROUND": "10",
        "AGGREGATION": "fedavg",
        "ROUNDS": str(max_rounds),
        "EPOCHS": str(cell.epochs),
        "BATCH_SIZE": str(cell.batch),
        "LEARNING_RATE": str(lr),
        "OPTIMIZER": optimizer,
        **extra,
    }
    with local_run(settings, workers, prefix="fedsim-mcmahan-") as run:
        arrived: dict[int, float] = {}  # round -> when its evaluation was seen
        while True:
            finished = run.proc.poll() is not None
            for entry in run.history():
                rnd = entry.get("round")
                if isinstance(rnd, int) and rnd not in arrived:
                    arrived[rnd] = time.monotonic()
                    out.rss_at_round[rnd] = run.memory.last
                    out.accuracy.append(round(float(entry["accuracy"]), 4))
                    print(
                        f"  {name} round {rnd}: test accuracy {entry['accuracy']:.4f}"
                        f" ({arrived[rnd] - run.started:.0f}s)",
                        flush=True,
                    )
                    if out.reached_round is None and entry["accuracy"] >= cell.target:
                        out.reached_round = rnd
            if out.reached_round is not None and stop_at_target:
                out.stopped = "target"
                break
            if finished:
                out.stopped = "rounds"
                break
            if time.monotonic() - run.started > max_seconds:
                out.stopped = "time limit"
                break
            time.sleep(0.25)
        stop(run.proc)
        out.wall_seconds = run.seconds()
        out.peak_rss_bytes = run.memory.peak
        out.load_after = os.getloadavg()[0]
        out.rounds_run = len(arrived)
        rounds = sorted(arrived)
        if len(rounds) >= 2:
            out.round_seconds = round(
                (arrived[rounds[-1]] - arrived[rounds[0]]) / (rounds[-1] - rounds[0]), 2
            )
        if out.stopped == "rounds" and run.proc.returncode not in (0, None) and not arrived:
            sys.stderr.write(run.output()[-3000:])
            raise SystemExit(f"reproduce_mcmahan: {name}: simulate.sh exited {run.proc.returncode}")
    return out


def rounds_text(out: Outcome) -> str:
    if out.reached_round is not None:
        return str(out.reached_round)
    return f"not reached in {out.rounds_run} ({max(out.accuracy, default=0):.2%} best)"


def table(outcomes: list[Outcome]) -> str:
    rows = [
        "| model | partition | E | B | lr | target | rounds to target | paper | s/round | wall"
        " | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for out in outcomes:
        cell = CELLS[out.cell]
        spr = f"{out.round_seconds:.1f} s" if out.round_seconds else "-"
        rows.append(
            f"| {cell.model} | {cell.partition} | {cell.epochs} | {cell.batch} | "
            f"{out.optimizer} {out.lr:g} | {cell.target:.0%} | {rounds_text(out)} | "
            f"{cell.paper_rounds} | {spr} | {out.wall_seconds:.0f} s | "
            f"{out.load_before:.1f}-{out.load_after:.1f} |"
        )
    return "\n".join(rows)


def w2(args: argparse.Namespace, extra: dict[str, str], bench: Bench) -> None:
    """W2: cnn-iid to 99% on two workers, then plain Keras doing the same rounds, back to back."""
    lr = args.lr or DEFAULT_LR["cnn"]
    out = run_cell("cnn-iid", args, extra, lr=lr, max_rounds=args.max_rounds)
    # Plain Keras doing the same rounds in one process (bench_keras.py w2).
    keras = child_json(
        "bench_keras.py", "w2", "--rounds", "3", "--lr", str(lr), *bench.child_args()
    )
    keras = keras["results"]
    steady = keras["round_seconds"][1:]  # round 1 traces the training step
    keras_spr = sum(steady) / len(steady)
    last = max(out.rss_at_round, default=0)
    growth = (
        out.rss_at_round[last] - out.rss_at_round[5] if 5 in out.rss_at_round and last > 5 else None
    )
    print()
    print(table([out]))
    print()
    print("| W2 | measured | aim |")
    print("|---|---|---|")
    print(f"| rounds to 99% | {rounds_text(out)} | 20 or fewer (Flower 1.42, lr 0.05: 38) |")
    ratio = f"{out.round_seconds / keras_spr:.2f}x" if out.round_seconds else "-"
    print(
        f"| seconds per round: fedsim, 2 workers / plain Keras, one process | "
        f"{out.round_seconds} s / {keras_spr:.1f} s = {ratio} | at most 1.1x |"
    )
    print(f"| peak memory of the run | {out.peak_rss_bytes / 2**30:.2f} GB | under 2 GB |")
    shown = f"{growth / 2**20:+.0f} MB (round 5 to {last})" if growth is not None else "-"
    print(f"| memory growth, round 5 to the last | {shown} | under 50 MB |")
    bench.mark_table()
    print(
        f"load (1 min) before/after the run {out.load_before:.2f}/{out.load_after:.2f}, "
        f"during Keras {keras['load']:.2f}; Keras rounds {keras['round_seconds']} s"
    )
    bench.finish({"w2": bench.figure(asdict(out), out.load_before), "keras": keras})


def sweep(args: argparse.Namespace, extra: dict[str, str], bench: Bench) -> None:
    """Each learning rate for --sweep-rounds rounds; the best test accuracy after the last wins."""
    try:
        rates = [float(v) for v in args.sweep.split(",")]
    except ValueError:
        raise SystemExit(
            f"reproduce_mcmahan: --sweep takes rates like 0.01,0.02, got {args.sweep}"
        ) from None
    if not rates or any(r <= 0 for r in rates):
        raise SystemExit(f"reproduce_mcmahan: --sweep rates must be positive, got {args.sweep}")
    cells = args.cells or ["cnn-iid"]
    results = []
    for name in cells:
        for lr in rates:
            out = run_cell(
                name, args, extra, lr=lr, max_rounds=args.sweep_rounds, stop_at_target=False
            )
            results.append(out)
    print()
    print("| cell | lr | test accuracy after each round | s/round | load |")
    print("|---|---|---|---|---|")
    for out in results:
        accs = " ".join(f"{a:.4f}" for a in out.accuracy)
        print(
            f"| {out.cell} | {out.optimizer} {out.lr:g} | {accs} | {out.round_seconds} | "
            f"{out.load_before:.1f}-{out.load_after:.1f} |"
        )
    bench.mark_table()
    for name in cells:
        mine = [o for o in results if o.cell == name and o.accuracy]
        if mine:
            best = max(mine, key=lambda o: o.accuracy[-1])
            print(
                f"best for {name}: lr {best.lr:g} ({best.accuracy[-1]:.4f} after round "
                f"{best.rounds_run})"
            )
    bench.finish([bench.figure(asdict(o), o.load_before) for o in results])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--cells", nargs="+", choices=sorted(CELLS), help="cells to run (default: all four)"
    )
    parser.add_argument("--max-rounds", type=int, default=300, help="ROUNDS of each run")
    parser.add_argument(
        "--max-seconds", type=float, default=3600.0, help="wall-time limit per cell"
    )
    parser.add_argument("--lr", type=float, help="learning rate of every cell (default: per model)")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--w2", action="store_true", help="W2: cnn-iid with Keras and memory")
    parser.add_argument("--sweep", metavar="LR,LR,...", help="compare learning rates")
    parser.add_argument("--sweep-rounds", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    add_arguments(parser)
    args = parser.parse_args()
    for flag, value in (
        ("--max-rounds", args.max_rounds),
        ("--workers", args.workers),
        ("--sweep-rounds", args.sweep_rounds),
    ):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.lr is not None and not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if not args.max_seconds > 0:
        parser.error(f"--max-seconds must be positive, got {args.max_seconds}")
    extra = key_values(parser, args.set)
    bench = Bench.from_args("reproduce_mcmahan", args)
    bench.header()
    if args.w2:
        w2(args, extra, bench)
        return
    if args.sweep:
        sweep(args, extra, bench)
        return
    outcomes = []
    for name in args.cells or CELLS:
        lr = args.lr or (ADAM_LR if args.optimizer == "adam" else DEFAULT_LR[CELLS[name].model])
        outcomes.append(run_cell(name, args, extra, lr=lr, max_rounds=args.max_rounds))
        print(table(outcomes[-1:]), flush=True)
        bench.mark_table()
    print()
    print(table(outcomes))
    bench.mark_table()
    bench.finish([bench.figure(asdict(o), o.load_before) for o in outcomes])


if __name__ == "__main__":
    main()
