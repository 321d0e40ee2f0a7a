#!/usr/bin/env python3
"""Every aggregation rule on whole local runs: final test accuracy, rounds to 95% and 97%, time.

    .venv/bin/python scripts/bench_rules.py                       every rule, the default run
    .venv/bin/python scripts/bench_rules.py --scenario shards     100 shards clients, 10 a round
    .venv/bin/python scripts/bench_rules.py --scenario attacks    10 clients, 2 attackers
    .venv/bin/python scripts/bench_rules.py --rules fedavg,krum --scenario shards --rounds 20

Scenarios:

- `default`: the default run (PARTITION=slices, 3 logical clients on 1-4 5-8
  9-12, mlp, EPOCHS 5). Round rules run ROUNDS=4 rounds of the 3 clients, so
  every slice is trained once; asynchronous rules make their 12 updates.
  With 3 updates a round, trimmed-mean runs with TRIM_BETA=0.34 (one trimmed
  at each end: the median of 3) and krum with KRUM_F=0 (n > 2f + 2).
- `shards`: McMahan et al.'s pathological non-IID split, PARTITION=shards
  NUM_CLIENTS=100 CLIENTS_PER_ROUND=10, mlp, 50 rounds (asynchronous rules:
  ROUNDS x CLIENTS_PER_ROUND = 500 updates, scored every EVAL_EVERY=10
  versions, one round's worth), E=1 and B=10 as McMahan et al.'s 2NN
  (EPOCHS=1 BATCH_SIZE=10; --epochs changes E).
- `attacks`: PARTITION=iid NUM_CLIENTS=10 CLIENTS_PER_ROUND=10, 30 rounds,
  EPOCHS=1: fedavg, median, trimmed-mean (TRIM_BETA=0.2: 2 of 10 trimmed at each
  end) and krum (KRUM_F=2), each without attackers and with ATTACKERS=2 sending
  ATTACK=scaled (ATTACK_SCALE 10) or ATTACK=label-flip.

fedbuff makes one version per FEDBUFF_K (10) updates, so it is scored at every
version (EVAL_EVERY=1), which is one round's worth in `shards`.

Rounds to a target: the first round whose evaluation reaches it; for an
asynchronous rule, the updates aggregated into the first version that reaches
it divided by the updates of a round (CLIENTS_PER_ROUND; 3 under slices).
Each run is one `scripts/simulate.sh --clients N` with its own MODEL_DIR,
TOKENS_FILE and port in a temporary folder; settings not given keep the code's
defaults (a .env is not read). Wall time is the whole run, TensorFlow's
start-up included; the 1-minute load average before and after is printed
beside it. Refuses to start above a load of 1.0 unless --force (scripts/benchlib).
A benchmark, not a test: it measures and prints.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field

from benchlib import Bench, add_arguments, key_values, local_run, stop

try:
    from fedsim import config
    from fedsim.aggregator import strategies
except ImportError as exc:  # pragma: no cover - a python without the project installed
    sys.exit(f"bench_rules: cannot import fedsim ({exc}); run it with .venv/bin/python")

TARGETS = (0.95, 0.97)
ATTACK_RULES = ("fedavg", "median", "trimmed-mean", "krum")
# attack name -> the settings that make it
ATTACKS: dict[str, dict[str, str]] = {
    "none": {},
    "scaled": {"ATTACK": "scaled", "ATTACKERS": "2"},
    "label-flip": {"ATTACK": "label-flip", "ATTACKERS": "2"},
}
# Settings a rule needs to run at all in a scenario: 3 updates a round trim nothing
# at TRIM_BETA=0.1 and are too few for KRUM_F=1 (n > 2f + 2).
RULE_SETTINGS: dict[str, dict[str, dict[str, str]]] = {
    "default": {"trimmed-mean": {"TRIM_BETA": "0.34"}, "krum": {"KRUM_F": "0"}},
}
SCENARIOS: dict[str, dict[str, str]] = {
    "default": {"ROUNDS": "4"},
    "shards": {
        "PARTITION": "shards",
        "NUM_CLIENTS": "100",
        "CLIENTS_PER_ROUND": "10",
        "MODEL": "mlp",
        "ROUNDS": "50",
        "EVAL_EVERY": "10",
        "EPOCHS": "1",
        "BATCH_SIZE": "10",
    },
    "attacks": {
        "PARTITION": "iid",
        "NUM_CLIENTS": "10",
        "CLIENTS_PER_ROUND": "10",
        "ROUNDS": "30",
        "EPOCHS": "1",
        "TRIM_BETA": "0.2",
        "KRUM_F": "2",
    },
}


@dataclass
class Run:
    scenario: str
    rule: str
    attack: str
    mode: str
    settings: dict[str, str]
    per_round: int
    final_accuracy: float | None = None
    final_loss: float | None = None
    final_version: int | None = None
    best_accuracy: float | None = None
    to_target: dict[str, float | None] = field(default_factory=dict)  # "0.95" -> rounds
    evaluations: int = 0
    curve: list[tuple[float | None, float]] = field(default_factory=list)  # (rounds, accuracy)
    refused_aggregates: int = 0
    wall_seconds: float = 0.0
    peak_rss_bytes: int = 0  # every process of the run, summed
    load_before: float = 0.0
    load_after: float = 0.0
    stopped: str = ""  # finished, time limit, failed
    rule_settings: dict[str, str] = field(default_factory=dict)  # the rule needs in this scenario

    @property
    def label(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.rule_settings.items())
        return f"`{self.rule}`" + (f" ({extra})" if extra else "")


def rounds_of(entry: dict, mode: str, per_round: int) -> float | None:
    """The round an evaluation belongs to; for asynchronous rules, updates / per_round."""
    if mode == "rounds":
        return entry.get("round")
    updates = entry.get("updates")
    return None if updates is None else updates / per_round


def run_one(
    scenario: str,
    rule: str,
    attack: str,
    overrides: dict[str, str],
    *,
    workers: int,
    max_seconds: float,
) -> Run | None:
    """One whole run; None (with a line saying why) when its settings are refused."""
    try:
        settings = config.load(environ={"FEDSIM_ENV_FILE": os.devnull, **overrides})
        mode = strategies.build(settings).mode
    except config.ConfigError as exc:
        print(f"{scenario} {rule}: not run: {exc}", flush=True)
        return None
    out = Run(scenario, rule, attack, mode, overrides, settings.per_round)
    out.load_before = round(os.getloadavg()[0], 2)
    with local_run(overrides, workers, prefix="fedsim-rules-") as run:
        try:
            run.proc.wait(timeout=max_seconds)
            out.stopped = "finished" if run.proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            out.stopped = "time limit"
        finally:
            stop(run.proc)
        out.wall_seconds = run.seconds()
        out.peak_rss_bytes = run.memory.peak
        out.load_after = round(os.getloadavg()[0], 2)
        text = run.output()
        # The aggregator's line for a new model refused as non-finite or exploding.
        out.refused_aggregates = text.count("refused aggregate:")
        entries = [e for e in run.history() if e.get("version")]
        if out.stopped == "failed" and not entries:
            sys.stderr.write(text[-3000:])
            raise SystemExit(
                f"bench_rules: {scenario} {rule}: simulate.sh exited {run.proc.returncode}"
            )
    entries.sort(key=lambda e: e["version"])
    out.evaluations = len(entries)
    out.curve = [(rounds_of(e, mode, out.per_round), e["accuracy"]) for e in entries]
    if entries:
        last = entries[-1]
        out.final_accuracy, out.final_loss = last["accuracy"], last["loss"]
        out.final_version = last["version"]
        out.best_accuracy = max(e["accuracy"] for e in entries)
    for target in TARGETS:
        reached = next((e for e in entries if e["accuracy"] >= target), None)
        out.to_target[f"{target:.2f}"] = (
            None if reached is None else rounds_of(reached, mode, out.per_round)
        )
    return out


def rounds_text(value: float | None) -> str:
    if value is None:
        return "not reached"
    return f"{value:g}" if float(value).is_integer() else f"{value:.1f}"


def accuracy_text(value: float | None) -> str:
    if value is None:
        return "-"
    return "nan" if math.isnan(value) else f"{value:.2%}"


def line(run: Run) -> str:
    targets = "  ".join(f"to {t}: {rounds_text(v)}" for t, v in run.to_target.items())
    note = "" if run.stopped == "finished" else f"  [{run.stopped}]"
    if run.refused_aggregates:
        note += f"  [{run.refused_aggregates} aggregates refused as non-finite or exploding]"
    return (
        f"{run.scenario} {run.rule:13} {run.attack:10} final {accuracy_text(run.final_accuracy)}"
        f" (v{run.final_version}, best {accuracy_text(run.best_accuracy)})  {targets}  "
        f"wall {run.wall_seconds:.0f}s  load {run.load_before:.1f}-{run.load_after:.1f}{note}"
    )


def rules_table(runs: list[Run]) -> str:
    rows = [
        "| rule | mode | final test accuracy | best | rounds to 95% | rounds to 97% | wall | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        note = "" if r.stopped == "finished" else f" ({r.stopped})"
        rows.append(
            f"| {r.label} | {r.mode} | {accuracy_text(r.final_accuracy)}{note} | "
            f"{accuracy_text(r.best_accuracy)} | "
            f"{rounds_text(r.to_target['0.95'])} | {rounds_text(r.to_target['0.97'])} | "
            f"{r.wall_seconds:.0f} s | {r.load_before:.1f}-{r.load_after:.1f} |"
        )
    return "\n".join(rows)


def attacks_table(runs: list[Run]) -> str:
    attacks = [a for a in ATTACKS if any(r.attack == a for r in runs)]
    heads = {"none": "no attackers", "scaled": "2 scaled (x10)", "label-flip": "2 label-flip"}
    rows = [
        "| rule | " + " | ".join(heads[a] for a in attacks) + " |",
        "|---|" + "---|" * len(attacks),
    ]
    for rule in dict.fromkeys(r.rule for r in runs):
        cells = []
        for a in attacks:
            found = [r for r in runs if r.rule == rule and r.attack == a]
            if not found:
                cells.append("-")
                continue
            r = found[0]
            note = "" if r.stopped == "finished" else f" ({r.stopped})"
            cells.append(accuracy_text(r.final_accuracy) + note)
        rows.append(f"| `{rule}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def parse_rules(raw: str | None, scenario: str) -> list[str]:
    if raw is None:
        return list(ATTACK_RULES if scenario == "attacks" else strategies.names())
    rules = []
    for item in raw.split(","):
        try:
            rules.append(strategies.parse_name(item))
        except ValueError as exc:
            raise SystemExit(f"bench_rules: --rules: {item.strip()!r} is not {exc}") from None
    return rules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="default")
    parser.add_argument(
        "--rules", help="comma-separated rules (default: every rule; attacks: the four)"
    )
    parser.add_argument("--rounds", type=int, help="ROUNDS of every run (default: per scenario)")
    parser.add_argument("--epochs", type=int, help="EPOCHS of every run (default: per scenario)")
    parser.add_argument(
        "--attacks",
        help=f"attacks scenario: comma-separated, of {', '.join(ATTACKS)} (default: all)",
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--max-seconds", type=float, default=1200.0, help="wall-time limit per run (default 1200)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    add_arguments(parser)
    args = parser.parse_args()
    for flag, value in (("--rounds", args.rounds), ("--epochs", args.epochs)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if not args.max_seconds > 0:
        parser.error(f"--max-seconds must be positive, got {args.max_seconds}")
    settings = key_values(parser, args.set)
    attacks = ["none"]
    if args.scenario == "attacks":
        attacks = [a.strip() for a in args.attacks.split(",")] if args.attacks else list(ATTACKS)
        unknown = [a for a in attacks if a not in ATTACKS]
        if unknown:
            parser.error(f"unknown attack {unknown[0]!r}; known: {', '.join(ATTACKS)}")
    elif args.attacks:
        parser.error("--attacks applies only to --scenario attacks")
    rules = parse_rules(args.rules, args.scenario)
    bench = Bench.from_args("bench_rules", args)

    base = dict(SCENARIOS[args.scenario])
    if args.rounds is not None:
        base["ROUNDS"] = str(args.rounds)
    if args.epochs is not None:
        base["EPOCHS"] = str(args.epochs)
    base.update(settings)
    shown = " ".join(f"{k}={v}" for k, v in base.items())
    resolved = config.load(environ={"FEDSIM_ENV_FILE": os.devnull, **base})
    bench.header()
    print(
        f"{args.workers} workers; {shown}; resolved: EPOCHS={resolved.epochs} "
        f"BATCH_SIZE={resolved.batch_size} {resolved.optimizer} "
        f"LEARNING_RATE={resolved.learning_rate:g} MODEL={resolved.model}",
        flush=True,
    )
    runs: list[Run] = []
    for rule in rules:
        for attack in attacks:
            overrides = {
                "AGGREGATION": rule,
                **RULE_SETTINGS.get(args.scenario, {}).get(rule, {}),
                **base,
                **ATTACKS[attack],
            }
            if rule == "fedbuff" and "EVAL_EVERY" not in settings:
                overrides["EVAL_EVERY"] = "1"  # a version is FEDBUFF_K updates
            run = run_one(
                args.scenario,
                rule,
                attack,
                overrides,
                workers=args.workers,
                max_seconds=args.max_seconds,
            )
            if run is not None:
                run.rule_settings = RULE_SETTINGS.get(args.scenario, {}).get(rule, {})
                runs.append(run)
                bench.say(line(run), run.load_before)
    print()
    bench.header()
    print(attacks_table(runs) if args.scenario == "attacks" else rules_table(runs))
    bench.mark_table()
    bench.finish([bench.figure(asdict(r), r.load_before) for r in runs])


if __name__ == "__main__":
    main()
