"""gunicorn settings for a profile: the image's (fedsim.aggregator.gunicorn_conf), and
each request thread's CPU under cProfile from the moment it takes a connection (gunicorn's
parsing too), written merged to FEDSIM_PROFILE_OUT when the worker exits.

    gunicorn -c python:benchlib.gunicorn_profile 'fedsim.aggregator.app:create_app()'
"""

import cProfile
import os
import pstats
import threading
import time

from fedsim.aggregator import gunicorn_conf as _image
from fedsim.aggregator.gunicorn_conf import *  # noqa: F403 (the image's settings)

_profiles: list[cProfile.Profile] = []
_mine = threading.local()
_lock = threading.Lock()


def post_worker_init(worker) -> None:
    _image.post_worker_init(worker)
    handle = worker.handle

    def profiled(conn):
        profile = getattr(_mine, "profile", None)
        if profile is None:
            profile = _mine.profile = cProfile.Profile(time.thread_time)
            with _lock:
                _profiles.append(profile)
        profile.enable()
        try:
            return handle(conn)
        finally:
            profile.disable()

    worker.handle = profiled


def worker_exit(server, worker) -> None:
    _image.worker_exit(server, worker)
    with _lock:
        if _profiles:
            stats = pstats.Stats(_profiles[0])
            for profile in _profiles[1:]:
                stats.add(profile)
            stats.dump_stats(os.environ["FEDSIM_PROFILE_OUT"])
