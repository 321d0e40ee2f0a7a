#!/usr/bin/env python3
"""Time each aggregation rule spends on a round's updates, on synthetic updates, printed.

    .venv/bin/python scripts/bench_aggregation.py                every rule: mlp with 10 and
                                                                  100 updates, cnn with 10;
                                                                  then krum with 10 to 200
    .venv/bin/python scripts/bench_aggregation.py --rules krum,median --repeats 5
    .venv/bin/python scripts/bench_aggregation.py --krum-n 10,30,100,200,400 --krum-models mlp

The rules are called directly, as the aggregator's state calls them: each is
built with `fedsim.aggregator.strategies.build` from `fedsim.config.load`
settings (AGGREGATION, MODEL, CLIENTS_PER_ROUND = n; FEDBUFF_K = n, so fedbuff
steps once per round's worth), on n synthetic updates: the seeded initial
weights of the model plus seeded Gaussian noise (standard deviation 0.01), as
float32 tensors of the model's layout. A round rule's time is one
`aggregate(current, updates)`; an asynchronous rule's is n `accept` calls, each
new version feeding the next. Only the rule's arithmetic is timed, not the
upload's decoding and checks, the checkpoint or the HTTP around it. Each
measurement is the median of --repeats calls after one untimed call (which also
sets up a server optimizer's state). Timings depend on the machine's load,
printed beside them, and for krum on BLAS's threads: OpenBLAS starts one per
core, which on a loaded machine can make krum several times slower than one
thread; compare with `OPENBLAS_NUM_THREADS=1` (the header says which ran).

Krum scores every update by its squared distances to the others: n(n - 1)/2
distances of d parameters, O(n^2 d); the coordinate-wise rules sort or
partition n values per coordinate, O(n d) to O(n log n d); the means are O(n d).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from benchlib import Bench, add_arguments

try:
    import numpy as np

    from fedsim import config, models
    from fedsim.aggregator import strategies
    from fedsim.aggregator.strategies import Global, Update
except ImportError as exc:  # pragma: no cover - a python without the project installed
    sys.exit(f"bench_aggregation: cannot import fedsim ({exc}); run it with .venv/bin/python")

NOISE = 0.01
# (model, updates per round) of the table of every rule
CELLS = (("mlp", 10), ("mlp", 100), ("cnn", 10))
KRUM_N = (10, 30, 100, 200)


def synthetic(model: str, n: int, seed: int = 0) -> tuple[dict, list[Update]]:
    """The model's seeded initial weights and n updates near them (float32, seeded)."""
    current = models.initial_weights(model, 42)
    rng = np.random.default_rng(seed)
    updates = []
    for k in range(n):
        tensors = {
            name: (w + rng.normal(0, NOISE, w.shape)).astype(np.float32)
            for name, w in current.items()
        }
        updates.append(Update(f"client-{k + 1}", f"u{k + 1}", 0, 600, tensors))
    return current, updates


def rule_for(name: str, model: str, n: int) -> strategies.Strategy:
    environ = {
        "FEDSIM_ENV_FILE": os.devnull,
        "AGGREGATION": name,
        "MODEL": model,
        "PARTITION": "iid",
        "NUM_CLIENTS": str(max(n, 100)),
        "CLIENTS_PER_ROUND": str(n),
        "FEDBUFF_K": str(n),
    }
    return strategies.build(config.load(environ=environ))


def one_round(rule: strategies.Strategy, current: Global, updates: list[Update]) -> Global:
    """One round's worth of updates through the rule; the global model it ends with."""
    if rule.mode == "rounds":
        return Global(rule.aggregate(current, updates), current.version + 1, current.samples)
    base, out = current, current
    for u in updates:
        u = Update(u.client_id, u.update_id, base.version, u.num_samples, u.tensors)
        new = rule.accept(u, out, base)
        if new is not None:
            out = Global(new, out.version + 1, out.samples + u.num_samples)
    return out


def measure(name: str, model: str, n: int, repeats: int, data: tuple, bench: Bench) -> dict:
    weights, updates = data
    rule = rule_for(name, model, n)
    current = Global(weights, 1, 6000)
    one_round(rule, current, updates)  # untimed: imports, server state set up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        one_round(rule, current, updates)
        times.append(time.perf_counter() - started)
    return bench.figure(
        {
            "rule": name,
            "model": model,
            "updates": n,
            "parameters": models.parameter_count(model),
            "median_seconds": statistics.median(times),
            "min_seconds": min(times),
        }
    )


def blas_threads() -> str:
    """The BLAS thread setting in force, as the environment gives it."""
    for key in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(key):
            return f"{key}={os.environ[key]}"
    return f"OpenBLAS default (one per core: {os.cpu_count()})"


def seconds_text(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def parse_list(raw: str, what: str, parse) -> list:
    try:
        items = [parse(v.strip()) for v in raw.split(",") if v.strip()]
    except ValueError as exc:
        raise SystemExit(f"bench_aggregation: {what}: {exc}") from None
    if not items:
        raise SystemExit(f"bench_aggregation: {what} is empty")
    return items


def krum_fit(results: list[dict], model: str) -> str:
    """c in t = c n^2 d from the largest krum measurement, and the n a 1 s and 10 s round allow."""
    mine = sorted((r for r in results if r["model"] == model), key=lambda r: r["updates"])
    if len(mine) < 2:
        return ""
    big = mine[-1]
    c = big["median_seconds"] / (big["updates"] ** 2 * big["parameters"])
    grow = big["median_seconds"] / mine[-2]["median_seconds"]
    ratio = big["updates"] / mine[-2]["updates"]
    at = {s: int((s / (c * big["parameters"])) ** 0.5) for s in (1, 10)}
    return (
        f"krum {model}: n {mine[-2]['updates']} -> {big['updates']} ({ratio:g}x) took "
        f"{grow:.1f}x as long (quadratic: {ratio**2:g}x); at c = t / (n^2 d) = {c:.2e} s, "
        f"a round of about {at[1]} updates takes 1 s and {at[10]} updates 10 s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rules", help="comma-separated rules (default: every rule)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per cell (default 3)")
    parser.add_argument(
        "--krum-n",
        default=",".join(map(str, KRUM_N)),
        help="updates per round of the krum scaling table (default 10,30,100,200)",
    )
    parser.add_argument(
        "--krum-models", default="mlp,cnn", help="models of the krum table (default mlp,cnn)"
    )
    parser.add_argument(
        "--krum-cnn-max",
        type=int,
        default=100,
        help="largest n for the cnn in the krum table (200 cnn updates hold 1.3 GB; default 100)",
    )
    add_arguments(parser)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    rules = (
        [strategies.parse_name(r) for r in parse_list(args.rules, "--rules", str)]
        if args.rules
        else list(strategies.names())
    )
    krum_n = parse_list(args.krum_n, "--krum-n", int)
    if any(n < 5 for n in krum_n):
        parser.error(f"--krum-n values must be at least 5 (krum needs n > 2f + 2), got {krum_n}")
    krum_models = parse_list(args.krum_models, "--krum-models", str)
    unknown = [m for m in krum_models if m not in models.SHAPES]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; known: {', '.join(models.SHAPES)}")

    bench = Bench.from_args("bench_aggregation", args)
    bench.header()
    print(
        f"numpy {np.__version__}, BLAS threads: {blas_threads()}; "
        f"median of {args.repeats} rounds after one untimed",
        flush=True,
    )
    results: list[dict] = []
    for model, n in CELLS:
        data = synthetic(model, n)
        for name in rules:
            r = measure(name, model, n, args.repeats, data, bench)
            results.append(r)
            bench.say(
                f"{name:14} {model} n={n:<4} {seconds_text(r['median_seconds']):>10} "
                f"(min {seconds_text(r['min_seconds'])}), load {r['load']:.1f}",
                r["load"],
            )
        del data
    krum: list[dict] = []
    if "krum" in rules:
        for model in krum_models:
            for n in krum_n:
                if model == "cnn" and n > args.krum_cnn_max:
                    continue
                r = measure("krum", model, n, args.repeats, synthetic(model, n), bench)
                krum.append(r)
                bench.say(
                    f"krum           {model} n={n:<4} {seconds_text(r['median_seconds']):>10} "
                    f"(min {seconds_text(r['min_seconds'])}), load {r['load']:.1f}",
                    r["load"],
                )

    loads = [r["load"] for r in results + krum]
    print()
    bench.header()
    print(
        f"load (1 min) {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores; "
        f"BLAS threads: {blas_threads()}"
    )
    print()
    heads = [f"{m}, {n} updates" for m, n in CELLS]
    print("| rule | " + " | ".join(heads) + " |")
    print("|---|" + "---|" * len(heads))
    for name in rules:
        cells = [
            seconds_text(r["median_seconds"])
            for m, n in CELLS
            for r in results
            if r["rule"] == name and r["model"] == m and r["updates"] == n
        ]
        print(f"| `{name}` | " + " | ".join(cells) + " |")
    bench.mark_table()
    if krum:
        print()
        ns = sorted({r["updates"] for r in krum})
        print("| krum, updates per round | " + " | ".join(str(n) for n in ns) + " |")
        print("|---|" + "---|" * len(ns))
        for model in krum_models:
            row = {r["updates"]: r for r in krum if r["model"] == model}
            cells = [seconds_text(row[n]["median_seconds"]) if n in row else "-" for n in ns]
            print(f"| {model} | " + " | ".join(cells) + " |")
        bench.mark_table()
        print()
        for model in krum_models:
            fit = krum_fit(krum, model)
            if fit:
                print(fit)
    bench.finish({"rules": results, "krum": krum})


if __name__ == "__main__":
    main()
