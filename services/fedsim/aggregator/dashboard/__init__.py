"""The dashboard at `GET /`: one page that follows the run live.

The page polls `GET /v1/status` and then `GET /v1/history?after=V` (only the
versions it may not hold yet, so a poll does not grow with the run) every two
seconds and redraws itself (no reload); while the aggregator restarts it says so and keeps
trying. The essentials, the current version and the last test accuracy, are
rendered into the HTML on the server, so they show without JavaScript too.

The app gives the dashboard one callable, `summary()`, that returns a `Summary`
(below): the blueprint knows nothing else of the aggregator's state.

    from fedsim.aggregator import dashboard
    dashboard.init_app(app, summary=lambda: state.summary())

The chart is drawn with Chart.js from Debian's package `libjs-chart.js`
(`/usr/share/javascript/chart.js/chart.min.js`); the aggregator serves that
file itself, so the page needs no internet. Where it is not installed, the page
says so in place of the chart and the rest still works.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypedDict

from flask import Blueprint, Flask, Response, current_app, render_template, send_file

# Debian's libjs-chart.js (bookworm: Chart.js 3.9.1): the same path on a Debian
# machine with the package and in the aggregator image, which copies the file.
CHART_JS = Path("/usr/share/javascript/chart.js/chart.min.js")

bp = Blueprint(
    "dashboard",
    __name__,
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)


class Summary(TypedDict):
    """What `summary()` returns: the essentials the page shows without JavaScript."""

    version: int  # the served model's version
    strategy: str  # the AGGREGATION rule, e.g. "fedavg"
    model: str  # "mlp" or "cnn"
    partition: str | Mapping[str, Any]  # "shards", or the settings as in /v1/status
    last_accuracy: float | None  # test accuracy (0-1) of the newest evaluated version
    last_round: int | None  # rounds done under round rules; None for asynchronous rules
    finished: bool  # the run has done all its rounds


SUMMARY_KEYS = frozenset(Summary.__annotations__)


def init_app(app: Flask, summary: Callable[[], Summary], chart_js: Path | str = CHART_JS) -> None:
    """Serve the dashboard on `app`: `GET /`, `GET /static/...`.

    `summary` is called once per page load; `chart_js` is where Chart.js lies.
    The app must not serve a static folder of its own at /static.
    """
    if not callable(summary):
        raise TypeError(f"dashboard: summary must be a callable returning a dict, not {summary!r}")
    if app.has_static_folder and app.static_url_path == bp.static_url_path:
        # Flask adds the app's own /static route whether or not the folder exists, and
        # it would shadow the dashboard's files.
        raise ValueError(
            f"dashboard: the app serves {app.static_url_path} itself; "
            "create it with Flask(__name__, static_folder=None)"
        )
    app.extensions["fedsim_dashboard"] = {"summary": summary, "chart_js": Path(chart_js)}
    app.register_blueprint(bp)


def _summary() -> Summary:
    got = current_app.extensions["fedsim_dashboard"]["summary"]()
    if not isinstance(got, Mapping):
        raise TypeError(f"dashboard: summary() must return a dict, not {type(got).__name__}")
    missing = SUMMARY_KEYS - set(got)
    if missing:
        raise KeyError(f"dashboard: summary() is missing {', '.join(sorted(missing))}")
    return got  # type: ignore[return-value]


def describe_partition(partition: str | Mapping[str, Any] | None) -> str:
    """`{"PARTITION": "shards", "NUM_CLIENTS": 20}` -> `shards (NUM_CLIENTS=20)`; a name as is."""
    if not partition:
        return "-"
    if isinstance(partition, str):
        return partition
    rest = ", ".join(f"{k}={v}" for k, v in partition.items() if k != "PARTITION")
    name = str(partition.get("PARTITION", "?"))
    return f"{name} ({rest})" if rest else name


def run_state(summary: Summary) -> str:
    """The one-line state of the run the page opens with (the script keeps it current)."""
    if summary["finished"]:
        return f"run finished at version {summary['version']}"
    if summary["version"] == 0:
        return "waiting for the first update"
    return "training"


@bp.get("/")
def index() -> Response:
    summary = _summary()
    accuracy = summary["last_accuracy"]
    response = Response(
        render_template(
            "dashboard/index.html",
            s=summary,
            state=run_state(summary),
            partition=describe_partition(summary["partition"]),
            accuracy="-" if accuracy is None else f"{accuracy:.2%}",
        ),
        mimetype="text/html",
    )
    # The page carries live values: never serve it from a cache.
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/static/vendor/chart.min.js")
def chart_js() -> Response:
    path: Path = current_app.extensions["fedsim_dashboard"]["chart_js"]
    if not path.is_file():
        # The page checks for the library and says the same in place of the chart.
        return Response(
            f"// Chart.js not found at {path}: install Debian's libjs-chart.js\n",
            status=404,
            mimetype="text/javascript",
        )
    return send_file(path, mimetype="text/javascript", conditional=True)
