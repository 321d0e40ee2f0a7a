"""The aggregator's Flask app factory.

gunicorn runs it as `fedsim.aggregator.app:create_app()` in one worker process
with threads: the global state lives in that process. The routes are in api.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from flask import Flask

from fedsim import config, tokens
from fedsim.aggregator import api, dashboard, holding, privacy, secagg_api
from fedsim.aggregator.metrics import Guarded, Metrics
from fedsim.aggregator.state import StartupError, State

log = logging.getLogger("fedsim.aggregator")

# gunicorn's "worker failed to boot" exit code: it stops instead of respawning the worker.
WORKER_BOOT_ERROR = 3


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app. Settings come from the environment, or FEDSIM_SETTINGS in `test_config`."""
    app = Flask(__name__, static_folder=None)  # the dashboard serves /static
    app.config.from_mapping(
        FEDSIM_SETTINGS=None,  # a config.Settings; None: read the environment
        FEDSIM_CLOCK=None,  # monotonic clock for leases, round timeouts, idle saves (tests swap it)
        FEDSIM_TICKER=True,  # background thread for round timeouts and idle saves
        # How long an idle worker's ask may wait for work; None: HOLD_SECONDS, or 0 under
        # a swapped clock (a held ask waits real seconds that such a clock does not see).
        FEDSIM_HOLD=None,
    )
    if test_config is not None:
        app.config.from_mapping(test_config)
    try:
        settings = app.config["FEDSIM_SETTINGS"] or config.load()
        clock = app.config["FEDSIM_CLOCK"]
        state = State.resume(settings, **({"clock": clock} if clock else {}))
        known = tokens.Store(settings.tokens_file)
    except (config.ConfigError, StartupError, tokens.TokenError) as exc:
        log.error("fedsim aggregator: error: %s", exc)
        raise SystemExit(WORKER_BOOT_ERROR) from exc
    # Werkzeug caps the body it reads, also without a Content-Length; one byte over the
    # limit so that a body it cut short is still seen to be too large.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_update_bytes + 1
    app.extensions["fedsim"] = state
    hold = app.config["FEDSIM_HOLD"]
    if hold is None:
        hold = 0.0 if clock else holding.HOLD_SECONDS
    state.holds = holding.Holds(float(hold), holding.slots_for(os.environ.get("THREADS")))
    app.extensions["fedsim_tokens"] = known
    metrics = Metrics()
    app.extensions["fedsim_metrics"] = metrics
    state.metrics = Guarded(metrics)
    metrics.set_version(state.snapshot.version)
    metrics.set_finished(state.queue.finished)
    if state.privacy is not None:  # epsilon of the rounds closed so far, after a resume too
        privacy.announce(state)
        metrics.dp_epsilon(state.privacy.epsilon(privacy.rounds_done(state)))
    api.init_app(app)
    if settings.secagg:
        secagg_api.init_app(app)
    dashboard.init_app(app, summary=state.summary)
    if app.config["FEDSIM_TICKER"]:
        # Often enough to end a round at its deadline or save when idle without much delay.
        deadline = settings.round_deadline
        every = deadline / 4 if isinstance(deadline, float) else 1.0
        state.start_ticker(max(0.05, min(1.0, settings.idle_save_seconds / 4, every)))
    return app
