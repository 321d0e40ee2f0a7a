"""`python -m fedsim.experiment FILE`: run an experiment file; `--report DIR`: its report again.

    python -m fedsim.experiment experiments/quick.toml                 the local engine
    python -m fedsim.experiment experiments/quick.toml --engine compose
    python -m fedsim.experiment experiments/quick.toml --dry-run       the runs it would make
    python -m fedsim.experiment experiments/quick.toml --force         run above a load of 1
    python -m fedsim.experiment --report results/quick                 runs.csv, summary.md,
                                                                       curves.png again

Run it from the project's folder (scripts/experiment.sh does): the local engine
runs the processes there and reads ./data unless DATA_DIR is set; the Compose
engine runs compose.yaml there. A sweep refuses to start above a 1-minute load of
1.0 (its times would measure the other work too) unless --force, which marks its
runs loaded in the report. Exit status: 0 done, 1 a run failed, 2 a bad
file or option, 130 interrupted (run the same command again to resume).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from fedsim.experiment import guard, report, runner, spec
from fedsim.experiment.watch import RunFailed

PROG = "experiment"


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # the runs' processes are stopped on the way out


def engine_for(name: str, root: Path) -> runner.Engine:
    if name == "compose":
        from fedsim.experiment.compose import ComposeEngine

        return ComposeEngine(root)
    from fedsim.experiment.local import KerasEngine, LocalEngine

    return KerasEngine(root) if name == "keras" else LocalEngine(root)


def remake(folder: Path) -> int:
    """The report of `folder` again, from its runs' files."""
    e = spec.load(folder / "experiment.toml")
    try:
        engine = json.loads((folder / runner.SWEEP).read_text())["engine"]
    except (OSError, ValueError, KeyError):
        engine = e.engine
    results = report.collect(e, folder, engine)
    if not results:
        raise spec.ExperimentError(f"{folder}: no finished run to report on")
    written = report.write(e, results, folder)
    print(f"report of {len(results)} runs: " + ", ".join(str(p) for p in written))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("file", nargs="?", type=Path, help="an experiment file (TOML)")
    parser.add_argument(
        "--engine",
        help="local (default), compose or keras (the plain Keras floor); beats the file's engine",
    )
    parser.add_argument("--results", type=Path, default=Path("results"),
                        help="where results/<name>/ goes (default ./results)")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="list the runs; run nothing")
    parser.add_argument(
        "--force",
        action="store_true",
        help=f"start even above a 1-minute load of {guard.LOAD_LIMIT:g}; the runs are marked loaded",
    )
    parser.add_argument("--report", type=Path, metavar="DIR",
                        help="write DIR's report again from its runs; run nothing")  # fmt: skip
    args = parser.parse_args(argv)
    if (args.file is None) == (args.report is None):
        parser.error("give an experiment file, or --report results/<name>")
    signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.report is not None:
            return remake(args.report)
        e = spec.load(args.file)
        if args.engine is not None:
            e = e.with_engine(args.engine)
        folder = args.results / e.name
        if args.dry_run:
            for p in runner.plan(e, folder):
                print(f"{p.job.label}  ({p.job.workers} workers, {p.job.folder})")
            return 0
        bench = guard.Bench(f"{PROG} {e.name}", force=args.force)
        root = Path.cwd()
        runner.sweep(
            e,
            engine_for(e.engine, root),
            folder,
            engine_for=lambda n: engine_for(n, root),
            started=runner.Started(bench.load_start, bench.loaded),
        )
    except spec.ExperimentError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except runner.SweepFailed as exc:
        print(f"\n{PROG}: {exc}; the report holds the others, the same command runs "
              "the failed again", file=sys.stderr)  # fmt: skip
        return 1
    except RunFailed as exc:
        print(f"\n{PROG}: a run failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"\n{PROG}: interrupted; finished runs are kept: the same command resumes",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
