"""Profiles of the upload path: each step's share of the CPU, and gunicorn's request
threads under cProfile (`gunicorn_profile.py`, the image's gunicorn settings plus that).

The shares are of CPU time on each request thread's own clock (time.thread_time), so
waits (the lock, the disk, the network) are not in them; cProfile slows small Python
functions more than numpy's and hashlib's work, so they are proportions to compare
before and after a change, not timings.
"""

from __future__ import annotations

import pstats

# The steps of an upload, by the function that does each (file suffix, function name).
STEPS = (
    ("gunicorn: parse the request", "gunicorn/http/parser.py", "__next__"),
    ("read the body", "fedsim/aggregator/api.py", "_read_body"),
    ("decode (safetensors)", "fedsim/weights.py", "decode"),
    ("validate (layout, finite)", "fedsim/pipeline/registry.py", "receive"),
    ("rule step (merge, checks)", "fedsim/aggregator/state.py", "rule_step"),
    ("publish the version", "fedsim/aggregator/state.py", "apply"),
    ("journal commit (DURABLE)", "fedsim/aggregator/saving.py", "sync"),
    ("checkpoint writes", "fedsim/aggregator/saving.py", "_save_once"),
)


def shares(stats: pstats.Stats) -> list[tuple[str, float]]:
    """(step, share of the profiled time) for each step seen, then "the rest"."""
    total = stats.total_tt  # type: ignore[attr-defined]
    found: dict[str, float] = {}
    for (path, _, func), row in stats.stats.items():  # type: ignore[attr-defined]
        for label, suffix, name in STEPS:
            if func == name and path.endswith(suffix):
                found[label] = found.get(label, 0.0) + row[3]  # cumulative time
    out = [(label, found[label] / total) for label, _, _ in STEPS if label in found]
    return [*out, ("the rest", 1 - sum(share for _, share in out))]


def print_shares(stats: pstats.Stats, rest: str = "the rest") -> None:
    for label, share in shares(stats):
        print(f"  {rest if label == 'the rest' else label:<30} {100 * share:5.1f}%")
