"""Experiments as files: a sweep over settings and seeds, one command, a report.

    python -m fedsim.experiment experiments/quick.toml [--engine compose]
    python -m fedsim.experiment --report results/quick

spec.py reads and checks the file; runner.py runs its cells one after another
(resumable) on an engine, local.py (local processes) or compose.py (Docker
Compose), following each run with watch.py (answers.py reads the aggregator's
status and history pages as the dashboard does) and measuring it with outcome.py;
report.py (its tables in tables.py) and curves.py write runs.csv, summary.md and
curves.png; progress.py draws the progress line; procs.py starts processes and
reads their memory.
docs/experiments.md describes the file, the command and the report.
"""
