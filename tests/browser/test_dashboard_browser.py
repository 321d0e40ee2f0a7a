"""The dashboard in headless Chromium (Debian's package, driven by Selenium).

A stand-in aggregator (tests/helpers/dashboard.py) serves the real blueprint
and a status and history the test moves on: the page must follow by itself,
chart points, every client, a refusal in the events, the attacker column, a
restart of the aggregator and the end of the run. A screenshot goes to
reports/dashboard.png.

Without chromium the test skips with the reason; with CI=true it fails instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedsim.aggregator import dashboard
from helpers.dashboard import FakeRun, Server, chromium, chromium_missing, fake_app

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() == "true"
WAIT = 20  # seconds for the page to catch up; it polls every 2 s


@pytest.fixture
def browser():
    missing = chromium_missing() or (
        None
        if dashboard.CHART_JS.is_file()
        else f"{dashboard.CHART_JS} absent: apt-get install libjs-chart.js"
    )
    if missing:
        if IN_CI:
            pytest.fail(missing + "; CI=true requires it")
        pytest.skip(missing)
    with chromium() as driver:
        yield driver


def wait_for(driver, condition, what: str):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # The page rebuilds its tables on every poll: an element found a moment
    # ago may be gone when it is read, so such a read is simply tried again.
    return WebDriverWait(
        driver, WAIT, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,)
    ).until(lambda d: condition(d), message=f"the page did not show {what} within {WAIT} s")


def rows(driver, selector: str) -> list[dict]:
    """The rows matching selector, read in one script so that a poll cannot
    replace them half-way: each row's data attributes, class, cells' text and
    the number of label-mix bars."""
    return driver.execute_script(
        """
        return [...document.querySelectorAll(arguments[0])].map((r) => ({
          data: {...r.dataset},
          cls: r.className,
          cells: [...r.querySelectorAll('td')].map((c) => c.innerText.trim()),
          mix: r.querySelectorAll('.mix span').length,
        }));
        """,
        selector,
    )


def text(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def chart_points(driver) -> int:
    return int(driver.find_element("id", "chart").get_attribute("data-points"))


def severe_console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_the_dashboard_follows_a_run(browser):
    run = FakeRun(num_clients=12, quorum=4, rounds=3)
    server = Server(fake_app(run))
    server.start()
    try:
        browser.get(server.url)
        # Before training: the state, and an empty chart.
        wait_for(browser, lambda d: text(d, "state") == "waiting for the first update", "waiting")
        wait_for(
            browser,
            lambda d: len(d.find_elements("css selector", "#clients tbody tr")) == 12,
            "clients",
        )
        assert chart_points(browser) == 0

        # Version 0 is evaluated, then a round closes and is evaluated: two points.
        run.evaluate(accuracy=0.098, loss=2.30)
        wait_for(browser, lambda d: chart_points(d) == 1, "the first chart point")
        run.close_round()
        run.evaluate(accuracy=0.912, loss=0.31)
        wait_for(browser, lambda d: chart_points(d) == 2, "a second chart point")
        assert browser.execute_script("return window.fedsimDashboard.chartShownMs") is not None
        drawn = browser.execute_script(
            "return Chart.getChart('chart').data.datasets.map(d => d.data.map(p => [p.x, p.y]))"
        )
        # accuracy, loss, and the privacy line, empty without DP
        assert drawn == [[[0, 0.098], [1, 0.912]], [[0, 2.3], [1, 0.31]], []]
        assert text(browser, "state") == "training"
        assert text(browser, "version") == "1"
        assert text(browser, "accuracy") == "91.20%"

        # Every logical client has its row, in order, with its sample count.
        clients = rows(browser, "#clients tbody tr")
        assert [r["data"]["client"] for r in clients] == [c["id"] for c in run.clients]
        assert clients[0]["cells"][1] == str(run.clients[0]["samples"])
        assert clients[0]["mix"] == sum(1 for n in run.clients[0]["labels"] if n)
        workers = rows(browser, "#workers tbody tr")
        assert [w["data"]["worker"] for w in workers] == ["w1", "w2"]
        # No attacker yet: no attacker column.
        assert not browser.find_element("css selector", "#clients th.attacker-col").is_displayed()

        # A refused update shows in the events, newest first.
        run.refuse("client-3", "stale")
        wait_for(
            browser,
            lambda d: (
                "update from client-3 refused: stale"
                in d.find_element("css selector", "#events li:first-child").text
            ),
            "the refusal",
        )
        assert rows(browser, "#events li:first-child")[0]["cls"] == "kind-refused"

        # Everyone equal: no population columns; one slow, flaky client shows them.
        assert not browser.find_element("css selector", "#clients th.population-col").is_displayed()
        run.profile("client-2", 3.0, 250_000.0, 0.1)
        wait_for(
            browser,
            lambda d: d.find_element("css selector", "#clients th.population-col").is_displayed(),
            "the population columns",
        )
        (slow,) = rows(browser, "tr[data-client='client-2']")
        assert slow["cells"][7:10] == ["\u00d73.00", "250 kB/s", "10.00% (2)"]
        (other,) = rows(browser, "tr[data-client='client-1']")
        assert other["cells"][7:10] == ["\u00d71.00", "\u221e", "0.00% (0)"]

        run.mark_attacker("client-5")
        wait_for(
            browser,
            lambda d: d.find_element("css selector", "#clients th.attacker-col").is_displayed(),
            "the attacker column",
        )
        assert rows(browser, "tr[data-client='client-5']")[0]["cls"] == "attacker"

        # The aggregator goes away and comes back on the same port.
        server.stop()
        wait_for(browser, lambda d: d.find_element("id", "conn").is_displayed(), "unreachable")
        assert text(browser, "conn") == "aggregator unreachable, retrying"
        run.close_round()
        run.evaluate(accuracy=0.95, loss=0.17)
        server.start()
        wait_for(browser, lambda d: not d.find_element("id", "conn").is_displayed(), "recovery")
        wait_for(browser, lambda d: chart_points(d) == 3, "a third chart point after the restart")

        run.close_round()
        run.evaluate(accuracy=0.9712, loss=0.094)
        run.finish()
        wait_for(browser, lambda d: text(d, "state") == "run finished at version 3", "the end")
        wait_for(browser, lambda d: chart_points(d) == 4, "the last chart point")

        reports = ROOT / "reports"
        reports.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(reports / "dashboard.png"))
        # Fetch errors while the server was down are expected; nothing else went wrong.
        errors = [e for e in severe_console_errors(browser) if "Failed to fetch" not in e
                  and "ERR_CONNECTION_REFUSED" not in e]  # fmt: skip
        assert errors == []
    finally:
        server.stop()


def test_the_history_is_fetched_by_pages_and_a_late_evaluation_is_not_missed(browser):
    run = FakeRun(num_clients=8, quorum=2, rounds=5)
    server = Server(fake_app(run))
    server.start()
    try:
        browser.get(server.url)
        run.evaluate(accuracy=0.1, loss=2.3)
        wait_for(browser, lambda d: chart_points(d) == 1, "version 0")
        # Versions 1 and 2 are made; 2 is scored before 1, as two evaluation tasks may be.
        run.close_round()
        run.close_round()
        wait_for(browser, lambda d: text(d, "version") == "2", "version 2 made")
        run.evaluate(accuracy=0.9, loss=0.3, version=2)
        wait_for(browser, lambda d: chart_points(d) == 2, "version 2 scored")
        run.evaluate(accuracy=0.8, loss=0.5, version=1)
        wait_for(browser, lambda d: chart_points(d) == 3, "version 1, scored late")

        drawn = browser.execute_script(
            "return Chart.getChart('chart').data.datasets[0].data.map(p => [p.x, p.y])"
        )
        assert drawn == [[0, 0.1], [1, 0.8], [2, 0.9]]
        # Once nothing is pending, a poll asks only for the versions after the last one.
        wait_for(browser, lambda d: run.asked[-1] == "2", "a page after version 2")
        assert None in run.asked and "0" in run.asked
    finally:
        server.stop()


def test_the_page_says_when_the_chart_library_is_missing(browser, tmp_path):
    run = FakeRun(num_clients=3)
    run.evaluate(accuracy=0.5, loss=1.0)
    with Server(fake_app(run, chart_js=tmp_path / "absent.js")) as server:
        browser.get(server.url)
        wait_for(browser, lambda d: d.find_element("id", "chart-note").is_displayed(), "the note")
        assert "libjs-chart.js" in text(browser, "chart-note")
        # The rest of the page still follows the run.
        wait_for(browser, lambda d: text(d, "accuracy") == "50.00%", "the accuracy")
        wait_for(
            browser,
            lambda d: len(d.find_elements("css selector", "#clients tbody tr")) == 3,
            "clients",
        )
