#!/usr/bin/env python3
"""Where a worker's memory goes over many tasks (issue 18's W2 growth).

One process trains tasks one after another as a worker does (fedsim.client.training's
Trainer: one model, a fresh optimizer per task, W2's settings by default: McMahan's CNN,
600 iid images a client, E = 5, B = 10, SGD at 0.02), scores the model every
--eval-every tasks on the 10,000 test images, and prints its resident memory (VmRSS)
and the blocks Python's own allocator holds (sys.getallocatedblocks: what grows there
is Python objects kept, not TensorFlow's native memory) after every --every tasks,
with the growth from task --from to the last. With --tracemalloc, Python's own
allocations are traced from task --from on: their growth in bytes, and the lines of
code that hold most of it (tracing slows the tasks, so the times are not comparable).
With --gc-every N, Python's cycle collector runs in full after every N tasks: what it
frees is garbage the worker carried, not memory it needed. With --release-every N the
allocator gives its free pages back after every N tasks, as a worker does when it waits
between rounds (fedsim.allocator.release); under tcmalloc each line also gives its own
counts (fedsim.allocator.held): allocated, its heap, the free pages it holds (what a
release gives back) and those it gave back.

    .venv/bin/python scripts/profile_worker_memory.py [--model cnn] [--tasks 60]
        [--momentum 0.9] [--threads 1] [--data ./data] [--tracemalloc] [--gc-every N]
        [--release-every N] [--json FILE]

Compare allocators by running it under them, e.g. `MALLOC_ARENA_MAX=2` or
`LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2`; the allocator in use is
printed. Refuses to start above a load of 1.0 unless --force. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

from benchlib import ROOT, Bench, add_arguments, allocator, rss_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn", choices=["cnn", "mlp"])
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--images", type=int, default=600, help="images a client")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=0.02)
    parser.add_argument("--momentum", type=float, default=0.0, help="sgd's (W2: 0)")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow's intra-op threads")
    parser.add_argument("--every", type=int, default=5, help="print memory every N tasks")
    parser.add_argument("--from", dest="start", type=int, default=10, help="growth from task")
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument(
        "--tracemalloc", action="store_true", help="trace Python's allocations from --from on"
    )
    parser.add_argument("--gc-every", type=int, default=0, help="gc.collect() every N tasks")
    parser.add_argument(
        "--release-every", type=int, default=0, help="allocator.release() every N tasks"
    )
    add_arguments(parser)
    args = parser.parse_args()
    if not 0 < args.start < args.tasks:
        parser.error(f"--from must be between 1 and --tasks - 1, got {args.start}")
    for flag in ("gc_every", "release_every"):
        if getattr(args, flag) < 0:
            dashed = "--" + flag.replace("_", "-")
            parser.error(f"{dashed} must be 0 (never) or more, got {getattr(args, flag)}")
    if not 0 <= args.momentum < 1:
        parser.error(f"--momentum must be at least 0 and below 1, got {args.momentum}")

    bench = Bench.from_args("profile_worker_memory", args)
    bench.header()
    from fedsim import allocator as malloc
    from fedsim import models, tfruntime

    tfruntime.configure(args.threads)
    from fedsim.client.training import Trainer

    bench.say(f"allocator: {allocator()}; {args.model}, {args.tasks} tasks of {args.images}")
    before = rss_bytes()
    trainer = Trainer(args.data, verify=False, model=args.model, seed=1)
    order = np.random.default_rng(1).permutation(len(trainer.labels))
    clients = [order[i : i + args.images] for i in range(0, len(order), args.images)]
    settings = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "optimizer": "sgd",
        "momentum": args.momentum,
    }
    tensors = models.initial_weights(args.model, seed=1)
    samples: list[dict] = []  # a task's figures, tcmalloc's counts among them
    started = time.monotonic()
    for task in range(1, args.tasks + 1):
        tensors, _ = trainer.train(tensors, clients[task % len(clients)], settings, seed=task)
        if task % args.eval_every == 0:
            trainer.evaluate(tensors)
        if args.gc_every and task % args.gc_every == 0:
            gc.collect()
        if args.release_every and task % args.release_every == 0:
            malloc.release()
        if args.tracemalloc and task == args.start:
            tracemalloc.start()
            traced_from = tracemalloc.take_snapshot()
        rss, blocks, held = rss_bytes(), sys.getallocatedblocks(), malloc.held()
        samples.append({"task": task, "rss_bytes": rss, "python_blocks": blocks,
                        "tcmalloc_bytes": held,
                        "seconds": time.monotonic() - started})  # fmt: skip
        if task % args.every == 0 or task == args.tasks:
            counts = "".join(f" {k} {v / 2**20:.1f}" for k, v in (held or {}).items())
            bench.say(
                f"task {task:4d}  RSS {rss / 2**20:8.1f} MiB  Python blocks {blocks:,}"
                + (f"  tcmalloc's MiB:{counts}" if held else "")
            )
    at_start = samples[args.start - 1]["rss_bytes"]
    end = samples[-1]["rss_bytes"]
    blocks = samples[-1]["python_blocks"] - samples[args.start - 1]["python_blocks"]
    per_task = (end - at_start) / (args.tasks - args.start)
    traced = None
    if args.tracemalloc:
        grown = tracemalloc.take_snapshot().compare_to(traced_from, "lineno")
        tracemalloc.stop()
        traced = {
            "growth_bytes": sum(d.size_diff for d in grown),
            "top": [{"where": str(d.traceback), "bytes": d.size_diff, "blocks": d.count_diff}
                    for d in sorted(grown, key=lambda d: -d.size_diff)[:8]],
        }  # fmt: skip
    result = bench.figure(
        {
            "allocator": allocator(),
            "model": args.model,
            "tasks": args.tasks,
            "rss_before_bytes": before,
            "rss_at_from_bytes": at_start,
            "rss_end_bytes": end,
            "growth_bytes": end - at_start,
            "growth_per_task_bytes": round(per_task),
            "python_blocks_growth": blocks,
            "python_traced": traced,
            "gc_every": args.gc_every,
            "release_every": args.release_every,
            "momentum": args.momentum,
            "seconds": round(samples[-1]["seconds"], 1),
            "samples": samples,
        }
    )
    bench.say(
        f"growth from task {args.start} to {args.tasks}: {(end - at_start) / 2**20:.1f} MiB "
        f"({per_task / 2**10:.0f} KiB a task), Python blocks {blocks:+,}; "
        f"{samples[-1]['seconds'] / args.tasks:.3f} s a task; {allocator()}"
    )
    if traced is not None:
        bench.say(f"Python's traced allocations from task {args.start}: "
                  f"{traced['growth_bytes'] / 2**20:+.1f} MiB; the most at")  # fmt: skip
        for top in traced["top"]:
            bench.say(
                f"  {top['bytes'] / 2**10:+9.0f} KiB {top['blocks']:+7,} blocks {top['where']}"
            )
    bench.finish([result])
    return 0


if __name__ == "__main__":
    sys.exit(main())
