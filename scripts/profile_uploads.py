#!/usr/bin/env python3
"""Where the aggregator's CPU goes per accepted mlp update: a profile, not a benchmark.

Posts --updates mlp updates (async-weighted, with the workers' token) to the aggregator
app in this process through Flask's test client, one after another: first unprofiled
(the CPU per update, all threads), then under cProfile on this thread's CPU clock, and
prints each step of the upload path as a share of the profiled CPU (waits for the disk
are not in it). One thread and no sockets: gunicorn's and nginx's own work is not in it
(bench_aggregator.py --profile has it), and the checkpoint writer (a thread of the app)
is profiled only when the requests write (--inline, as under the tests). Proportions,
which a busy machine distorts little; timings are bench_aggregator.py's.

    .venv/bin/python scripts/profile_uploads.py [--updates 300] [--save-model 2]
        [--durable] [--inline] [--top 0]
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as gunicorn_conf sets it

from benchlib import serve
from benchlib.profile import print_shares
from fedsim import config, weights
from fedsim.aggregator.app import create_app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=300, help="updates profiled")
    parser.add_argument("--save-model", type=int, default=2, help="SAVE_MODEL (default 2)")
    parser.add_argument("--durable", action="store_true", help="DURABLE=true")
    parser.add_argument(
        "--inline", action="store_true", help="no writer thread: requests write checkpoints"
    )
    parser.add_argument("--top", type=int, default=0, help="also print the N costliest calls")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # one line per update, and skipped evaluations

    with tempfile.TemporaryDirectory(prefix="fedsim-profile-") as name:
        tmp = Path(name)
        env = serve.stand_in(tmp)
        env |= {"AGGREGATION": "async-weighted", "SAVE_MODEL": str(args.save_model)}
        env |= {"DURABLE": "true" if args.durable else "false"}
        settings = config.load(environ=env, env_file=tmp / "no.env")
        app = create_app({"FEDSIM_SETTINGS": settings, "FEDSIM_TICKER": not args.inline})
        client = app.test_client()
        headers = {**serve.workers_header(env), "Content-Type": "application/octet-stream"}
        meta = {"client_id": "client-1", "update_id": "0" * serve.ID_WIDTH, "base_version": 0}
        body = bytearray(weights.encode(serve.mlp_weights(1), {**meta, "num_samples": 5000}))
        at = body.index(b"0" * serve.ID_WIDTH)

        def post(phase: int, n: int) -> None:
            for i in range(n):
                body[at : at + serve.ID_WIDTH] = f"{phase:02d}{i:030d}".encode()
                answer = client.post("/v1/updates", data=bytes(body), headers=headers)
                if answer.status_code != 200 or answer.get_json()["duplicate"]:
                    raise SystemExit(f"update refused: {answer.status_code} {answer.data[:200]!r}")

        post(0, 20)  # warm: imports, first versions
        cpu = time.process_time()
        post(1, args.updates)
        per_update = 1000 * (time.process_time() - cpu) / args.updates
        profile = cProfile.Profile(time.thread_time)  # CPU of this thread: no disk waits
        profile.enable()
        post(2, args.updates)
        profile.disable()
        app.extensions["fedsim"].close()

    stats = pstats.Stats(profile)
    print(
        f"{args.updates} mlp updates, SAVE_MODEL={args.save_model}, "
        f"DURABLE={str(args.durable).lower()}, checkpoints "
        f"{'in the request' if args.inline else 'by the writer thread (not profiled)'}: "
        f"{per_update:.2f} ms of CPU per update unprofiled (this process, all threads)"
    )
    print_shares(stats, "the rest (Flask, test client)")
    if args.top:
        stats.sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
