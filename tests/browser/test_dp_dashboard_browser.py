"""The dashboard under differential privacy, in headless Chromium: epsilon beside the accuracy
and as its own line on the chart, and "ε = ∞" for a run without noise."""

from __future__ import annotations

import pytest
from test_dashboard_browser import browser, chart_points, text, wait_for  # noqa: F401

from helpers.dashboard import FakeRun, Server, fake_app

pytestmark = pytest.mark.browser


def with_epsilon(run: FakeRun, epsilon: float | None) -> None:
    """Give the newest history entry the epsilon and delta a DP run writes."""
    with run.lock:
        run.history[-1].update(epsilon=epsilon, delta=0.0063)


def test_the_dashboard_draws_epsilon_beside_accuracy(browser):  # noqa: F811
    run = FakeRun(num_clients=12, quorum=4, rounds=3)
    server = Server(fake_app(run))
    server.start()
    try:
        browser.get(server.url)
        run.evaluate(accuracy=0.098, loss=2.30)
        with_epsilon(run, 0.0)
        run.close_round()
        run.evaluate(accuracy=0.8, loss=0.6)
        with_epsilon(run, 4.42)
        wait_for(browser, lambda d: chart_points(d) == 2, "two chart points")
        wait_for(browser, lambda d: "ε = 4.42 at δ = 0.0063" in text(d, "accuracy-detail"), "ε")
        drawn = browser.execute_script(
            "const c = Chart.getChart('chart'); return [c.data.datasets[2].data.map(p => "
            "[p.x, p.y]), c.data.datasets[2].hidden, c.options.scales.eps.display]"
        )
        assert drawn == [[[0, 0], [1, 4.42]], False, True]
        # No noise: epsilon is null in the history, "ε = ∞" on the page, no line drawn.
        run.close_round()
        run.evaluate(accuracy=0.85, loss=0.5)
        with_epsilon(run, None)
        wait_for(browser, lambda d: "ε = ∞" in text(d, "accuracy-detail"), "ε = ∞")
    finally:
        server.stop()
