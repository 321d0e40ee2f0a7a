"""gunicorn settings for the aggregator.

    gunicorn -c python:fedsim.aggregator.gunicorn_conf 'fedsim.aggregator.app:create_app()'

One worker process, because the global model lives in it; threads serve the
requests. On SIGTERM the worker finishes its requests and writes a final
checkpoint of unsaved updates in `worker_exit`. BIND and THREADS come from the
environment; command-line flags (e.g. `-b`) override them.
"""

from __future__ import annotations

import json
import logging
import os

# One BLAS thread: the aggregator's numpy work (means, medians, Krum's distances) is
# small, and on a busy machine a thread per core made Krum 15-20 times slower. Set
# before numpy is first imported (the app imports it).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from gunicorn.glogging import Logger

from fedsim import allocator
from fedsim.config import ConfigError


def _threads(raw: str) -> int:
    """THREADS as a positive integer; gunicorn prints the error's one line and exits."""
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ConfigError("THREADS", raw, "an integer >= 1")
    return int(raw)


bind = os.environ.get("BIND", "127.0.0.1:8080")  # Compose sets 0.0.0.0:8080
workers = 1  # the state is in-process; a second worker would hold a second model
worker_class = "gthread"
threads = _threads(os.environ.get("THREADS", "8"))  # 8: the bench's 8 uploaders each get a thread
graceful_timeout = 8  # finish requests and checkpoint within Docker's default 10 s stop timeout
timeout = 60  # a stuck worker is killed after this; a request takes milliseconds
keepalive = 5  # clients reuse their connection between pull and push
control_socket_disable = True  # no ~/.gunicorn control socket: unused, and HOME may be read-only


class QuietAccessLogger(Logger):
    """gunicorn's logger, which builds every request's access line only to drop it when
    the access logger is off (below): a tenth of a millisecond per upload for nothing."""

    def access(self, resp, req, environ, request_time) -> None:
        if self.access_log.isEnabledFor(logging.INFO):
            super().access(resp, req, environ, request_time)


logger_class = QuietAccessLogger
# The app's loggers (fedsim.*) print beside gunicorn's own, in the same format as the clients.
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "fedsim": {
            "format": "%(asctime)s %(levelname)s %(name)s: %(message)s",
            "datefmt": "%H:%M:%S",
        }
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "fedsim",
            "stream": "ext://sys.stdout",
        }
    },
    "root": {"level": "INFO", "handlers": ["console"]},
    "loggers": {
        "gunicorn.error": {
            "level": "INFO",
            "handlers": ["console"],
            "propagate": False,
            "qualname": "gunicorn.error",
        },
        "gunicorn.access": {
            # Access lines are off: the app logs one line per accepted or refused update.
            "level": "WARNING",
            "handlers": ["console"],
            "propagate": False,
            "qualname": "gunicorn.access",
        },
    },
}


def on_starting(server) -> None:
    server.log.info("memory allocator: %s", allocator.described())


def worker_exit(server, worker) -> None:
    """Checkpoint unsaved updates as the worker stops (SIGTERM, SIGINT or a restart)."""
    app = getattr(worker, "wsgi", None)
    state = getattr(app, "extensions", {}).get("fedsim") if app is not None else None
    if state is not None:
        state.close()


def _json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's own refusals, in the API's JSON form: a request it cannot parse before
    the app sees it (a Content-Length of "zz", "-1", "0x10" or " 5", both Content-Length
    and Transfer-Encoding, a bad request line) gets `{"error", "detail"}` like the app's."""
    from gunicorn import util

    code = reason.lower().replace(" ", "_")
    body = json.dumps({"error": code, "detail": mesg}).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


def post_worker_init(worker) -> None:
    """Answer what gunicorn refuses itself in JSON (see _json_error)."""
    from gunicorn import util

    util.write_error = _json_error
