"""fedsim.aggregator.dashboard through Flask's test client: the page without JavaScript,
its static files, Chart.js from Debian's package, and a bad summary callable."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from flask import Flask

from fedsim.aggregator import dashboard
from helpers.dashboard import FakeRun, fake_app

PACKAGE = Path(dashboard.__file__).parent
STATIC = PACKAGE / "static"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def run() -> FakeRun:
    return FakeRun(num_clients=6, quorum=3, rounds=4)


@pytest.fixture
def chart_js(tmp_path: Path) -> Path:
    path = tmp_path / "chart.min.js"
    path.write_text("/* stand-in for Chart.js */ window.Chart = function () {};\n")
    return path


@pytest.fixture
def client(run, chart_js):
    return fake_app(run, chart_js=chart_js).test_client()


def text_of(html: str, element_id: str) -> str:
    m = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', html)
    assert m, f"no element with id {element_id}"
    return m.group(1)


def test_before_training_the_page_says_it_waits_for_the_first_update(client):
    r = client.get("/")
    html = r.get_data(as_text=True)
    assert r.status_code == 200
    assert r.mimetype == "text/html"
    assert r.headers["Cache-Control"] == "no-store"
    assert text_of(html, "state") == "waiting for the first update"
    assert text_of(html, "version") == "0"
    assert text_of(html, "accuracy") == "-"
    assert text_of(html, "set-model") == "mlp"
    assert text_of(html, "set-rule") == "fedavg"
    assert text_of(html, "set-partition") == "shards (SEED=42, NUM_CLIENTS=6)"


def test_version_and_last_accuracy_are_rendered_on_the_server(client, run):
    run.evaluate(accuracy=0.1, loss=2.3)
    run.close_round()
    run.close_round()
    run.evaluate(accuracy=0.9712, loss=0.0934)
    html = client.get("/").get_data(as_text=True)
    assert text_of(html, "state") == "training"
    assert text_of(html, "version") == "2"
    assert text_of(html, "accuracy") == "97.12%"
    assert text_of(html, "round") == "2"
    assert "<title>fedsim · version 2</title>" in html
    # Without JavaScript the page reloads itself to stay current.
    assert '<noscript><meta http-equiv="refresh" content="10">' in html


def test_after_the_run_the_page_names_the_final_version(client, run):
    for _ in range(4):
        run.close_round()
    run.finish()
    html = client.get("/").get_data(as_text=True)
    assert text_of(html, "state") == "run finished at version 4"


def test_summary_values_are_escaped(chart_js):
    run = FakeRun()
    app = Flask("t", static_folder=None)
    dashboard.init_app(
        app,
        summary=lambda: {**run.summary(), "model": "<script>x</script>"},
        chart_js=chart_js,
    )
    html = app.test_client().get("/").get_data(as_text=True)
    assert "<script>x</script>" not in html
    assert "&lt;script&gt;x&lt;/script&gt;" in html


def test_static_files_and_the_chart_library_are_served(client, chart_js):
    html = client.get("/").get_data(as_text=True)
    scripts = re.findall(r'<script src="([^"]+)"', html)
    styles = re.findall(r'<link rel="stylesheet" href="([^"]+)"', html)
    assert scripts == ["/static/vendor/chart.min.js", "/static/dashboard.js"]
    assert styles == ["/static/dashboard.css"]
    # Files are streamed: each response is closed, so no file handle is left open.
    with client.get("/static/dashboard.js") as js:
        assert js.status_code == 200
        assert js.get_data() == (STATIC / "dashboard.js").read_bytes()
    with client.get("/static/dashboard.css") as css:
        assert css.status_code == 200
        assert css.mimetype == "text/css"
    with client.get("/static/vendor/chart.min.js") as chart:
        assert chart.status_code == 200
        assert chart.mimetype == "text/javascript"
        assert chart.get_data() == chart_js.read_bytes()
        etag = chart.headers["ETag"]
    # A second load is answered from the browser's cache.
    with client.get("/static/vendor/chart.min.js", headers={"If-None-Match": etag}) as again:
        assert again.status_code == 304


def test_missing_chart_library_is_a_404_naming_the_package(run, tmp_path):
    client = fake_app(run, chart_js=tmp_path / "absent.js").test_client()
    r = client.get("/static/vendor/chart.min.js")
    assert r.status_code == 404
    assert "libjs-chart.js" in r.get_data(as_text=True)
    # The page itself still renders.
    assert client.get("/").status_code == 200


def test_debian_chart_js_when_installed():
    if not dashboard.CHART_JS.is_file():
        pytest.skip(f"{dashboard.CHART_JS} absent: apt-get install libjs-chart.js")
    head = dashboard.CHART_JS.read_bytes()[:200].decode()
    assert "Chart.js v3." in head


@pytest.mark.parametrize(
    ("summary", "error", "message"),
    [
        (lambda: None, TypeError, "summary\\(\\) must return a dict, not NoneType"),
        (lambda: {"version": 1}, KeyError, "summary\\(\\) is missing finished, last_accuracy"),
    ],
)
def test_a_bad_summary_is_named(chart_js, summary, error, message):
    app = Flask("t", static_folder=None)
    dashboard.init_app(app, summary=summary, chart_js=chart_js)
    app.testing = True  # let the exception through instead of a 500
    with pytest.raises(error, match=message):
        app.test_client().get("/")


def test_summary_must_be_callable():
    with pytest.raises(TypeError, match="summary must be a callable"):
        dashboard.init_app(Flask("t", static_folder=None), summary={"version": 1})


def test_an_app_with_its_own_static_route_is_refused(chart_js):
    with pytest.raises(ValueError, match=r"create it with Flask\(__name__, static_folder=None\)"):
        dashboard.init_app(Flask("t"), summary=FakeRun().summary, chart_js=chart_js)


def test_describe_partition():
    assert dashboard.describe_partition({"PARTITION": "iid"}) == "iid"
    assert (
        dashboard.describe_partition({"PARTITION": "dirichlet", "DIRICHLET_ALPHA": 0.5})
        == "dirichlet (DIRICHLET_ALPHA=0.5)"
    )
    assert dashboard.describe_partition({}) == "-"
    assert dashboard.describe_partition("shards") == "shards"


def test_page_files_are_small():
    """The page's own files, without Chart.js, stay a few kilobytes each."""
    template = Path(dashboard.__file__).parent / "templates" / "dashboard" / "index.html"
    for path in (template, STATIC / "dashboard.js", STATIC / "dashboard.css"):
        assert path.stat().st_size < 16_000, path


def test_the_page_files_are_declared_as_package_data():
    """A non-editable install (the aggregator image) copies only declared data files."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data = pyproject["tool"]["setuptools"].get("package-data", {})
    patterns = data.get("fedsim.aggregator.dashboard", [])
    files = [
        p.relative_to(PACKAGE)
        for p in PACKAGE.rglob("*")
        if p.is_file() and p.suffix in {".html", ".js", ".css"}
    ]
    assert files
    missing = [str(f) for f in files if not any(f.match(pattern) for pattern in patterns)]
    assert not missing, (
        f"not in [tool.setuptools.package-data] fedsim.aggregator.dashboard: {missing}"
    )
