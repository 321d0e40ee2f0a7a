#!/usr/bin/env python3
"""Benchmark the dashboard page in headless Chromium (Debian's chromium and chromium-driver).

Measures and prints:
  - the page weight: bytes of the HTML, the page's script and style, and Chart.js,
    as served (no compression), and the bytes of one poll (status + history);
  - the time from navigation start until the chart shows its first point, over
    `--loads` page loads, each in a fresh browser profile (nothing cached).

    .venv/bin/python scripts/bench_dashboard.py [--loads 5] [--clients 100] [--points 50]
    .venv/bin/python scripts/bench_dashboard.py --url http://127.0.0.1:8080/ [--hold 30]

By default it serves the dashboard from the stand-in aggregator of the tests
(tests/helpers/dashboard.py) with `--clients` logical clients and `--points`
evaluated rounds. With `--url` it measures a running aggregator instead and
then keeps the page open `--hold` seconds (polling every 2 s), e.g. while
scripts/bench_aggregator.py runs. Refuses to start above a load of 1.0 unless --force.
A benchmark, not a test: it gates nothing.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import urllib.request
from urllib.parse import urljoin

from benchlib import ROOT, Bench, add_arguments

sys.path.insert(0, str(ROOT / "tests"))
from helpers.dashboard import FakeRun, Server, chromium, chromium_missing, fake_app

RESOURCES = ("", "static/dashboard.js", "static/dashboard.css", "static/vendor/chart.min.js")
POLL = ("v1/status", "v1/history")


def size(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as r:
        return len(r.read())


def time_to_chart(url: str, timeout: float = 30) -> float:
    """Milliseconds from navigation start until the chart has a point, in a fresh profile."""
    with chromium() as driver:
        driver.get(url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            shown = driver.execute_script("return window.fedsimDashboard?.chartShownMs ?? null")
            if shown is not None:
                return float(shown)
            time.sleep(0.05)
    raise SystemExit(f"bench_dashboard: the chart showed no point within {timeout:.0f} s at {url}")


def hold(url: str, seconds: float) -> None:
    with chromium() as driver:
        driver.get(url)
        time.sleep(seconds)
        polls, errors = driver.execute_script(
            "return [window.fedsimDashboard.polls, window.fedsimDashboard.errors]"
        )
    print(f"page held open {seconds:.0f} s: {polls} polls, {errors} failed")


def report(url: str, loads: int, bench: Bench) -> dict:
    sizes = {name or "page (HTML)": size(urljoin(url, name)) for name in RESOURCES}
    for name, n in sizes.items():
        print(f"  {name:30s} {n:>9,d} bytes")
    print(f"  {'page weight':30s} {sum(sizes.values()):>9,d} bytes")
    own = sum(n for name, n in sizes.items() if "vendor" not in name)
    print(f"  {'  without Chart.js':30s} {own:>9,d} bytes")
    poll = sum(size(urljoin(url, p)) for p in POLL)
    print(f"  {'one poll (status + history)':30s} {poll:>9,d} bytes, every 2 s")
    load = bench.load()
    times = [time_to_chart(url) for _ in range(loads)]
    bench.say(
        f"time to the first chart point: median {statistics.median(times):.0f} ms "
        f"(min {min(times):.0f}, max {max(times):.0f}, {loads} loads, fresh profile each)",
        load,
    )
    return {
        "bytes": sizes,
        "poll_bytes": poll,
        "chart_ms": bench.figure({"median": statistics.median(times), "all": times}, load),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=5, help="page loads to time (5)")
    parser.add_argument("--clients", type=int, default=100, help="logical clients (100)")
    parser.add_argument("--points", type=int, default=50, help="evaluated rounds (50)")
    parser.add_argument("--url", help="a running aggregator's dashboard instead of the stand-in")
    parser.add_argument("--hold", type=float, default=0, help="then keep the page open, seconds")
    add_arguments(parser)
    args = parser.parse_args()
    missing = chromium_missing()
    if missing:
        raise SystemExit(f"bench_dashboard: {missing}")
    bench = Bench.from_args("bench_dashboard", args)
    bench.header()

    if args.url:
        print(f"dashboard at {args.url}")
        result = report(args.url, args.loads, bench)
        if args.hold:
            hold(args.url, args.hold)
        bench.finish(result)
        return

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    run = FakeRun(num_clients=args.clients, quorum=10, rounds=args.points)
    run.evaluate(accuracy=0.1, loss=2.3)
    for k in range(1, args.points):
        run.close_round()
        run.evaluate(accuracy=0.9 + 0.08 * k / args.points, loss=0.3 - 0.2 * k / args.points)
        run.refuse(f"client-{k % args.clients + 1}", "stale")
    with Server(fake_app(run)) as server:
        print(
            f"stand-in aggregator: {args.clients} clients, {args.points} chart points, "
            f"{len(run.events)} events"
        )
        bench.finish(report(server.url, args.loads, bench))


if __name__ == "__main__":
    main()
