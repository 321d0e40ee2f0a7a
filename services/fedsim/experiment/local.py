"""The local engine: a run as local processes, started as scripts/simulate.sh starts them.

prepare, then the aggregator under gunicorn on 127.0.0.1 (a free port), then
the workers, each `python -m fedsim.client` with the run's settings and its own
log. The settings are the code's defaults, then the run's: no `.env` is read,
and the caller's environment keeps no fedsim setting. Each process runs in its
own process group, so an interrupted sweep stops all of them. The run's model
folder (checkpoints) is removed at the end; its history and logs are kept.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedsim import config
from fedsim.allocator import JEMALLOC, TCMALLOC, preloaded
from fedsim.experiment.answers import Answers
from fedsim.experiment.outcome import Raw
from fedsim.experiment.procs import PeakMemory, free_port, start, stop, trees_rss
from fedsim.experiment.watch import Job, RunFailed, follow, load, tail

HEALTH_SECONDS = 120  # the aggregator answers /healthz within this, or the run fails
# The status and a history page are read as often as the dashboard reads them: the
# progress comes from the history file, these only measure the answers' sizes.
ANSWERS_SECONDS = 2.0


def read_history(path: Path) -> list[dict[str, Any]]:
    """The history's entries, one per version, oldest first; a torn last line (mid-append)
    and anything that is not an entry are skipped."""
    return HistoryTail(path)()


class HistoryTail:
    """`read_history` for a poll: each call parses only the lines appended since the last
    (a whole line at a time; a file replaced, as a restart rewrites it, is read again from
    its start), so a poll does not grow with the run's length."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: tuple[int, int] | None = None  # (device, inode) of the file read
        self._offset = 0
        self._by_version: dict[int, dict[str, Any]] = {}

    def __call__(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                stat = os.fstat(f.fileno())
                if (stat.st_dev, stat.st_ino) != self._file or stat.st_size < self._offset:
                    self._file, self._offset, self._by_version = (stat.st_dev, stat.st_ino), 0, {}
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        whole = data[: data.rfind(b"\n") + 1]  # a torn last line waits for its end
        self._offset += len(whole)
        for line in whole.decode("utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("version"), int):
                self._by_version[entry["version"]] = entry
        return [self._by_version[v] for v in sorted(self._by_version)]


def clean_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without any fedsim or Compose setting."""
    return config.without_settings(environ)


def get(url: str, timeout: float = 5) -> bytes | None:
    """GET `url`'s body; None when nothing answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except OSError:
        return None


def watch(
    job: Job,
    model_dir: Path,
    pids: Mapping[str, int],
    finished: Callable[[], bool],
    on_entry: Callable[[dict[str, Any]], None],
    clock: float,
    answers: Answers | None = None,
) -> tuple[str, list[dict[str, Any]], dict[int, dict[str, int]], float, int]:
    """Follow a run's history until `finished`, sampling the memory of its processes (`pids`
    by name, each with its children) and polling the aggregator's `answers`, when given:
    (status, entries, memory by process at each version, seconds since `clock`, peak of
    their sum)."""

    tail = HistoryTail(model_dir / "history.jsonl")

    def entries() -> list[dict[str, Any]]:
        if answers is not None:
            answers.entries()
        return tail()

    with PeakMemory(lambda: trees_rss(pids)) as memory:
        status, entries_seen, memory_at = follow(
            job,
            entries=entries,
            done=finished,
            memory=lambda: memory.parts,
            on_entry=on_entry,
        )
        seconds = time.monotonic() - clock
    return status, entries_seen, memory_at, seconds, memory.peak


class LocalEngine:
    name = "local"

    def __init__(self, root: Path, environ: Mapping[str, str] | None = None) -> None:
        self.root = root  # the project folder: the processes' working directory
        self.base = clean_environ(environ)
        given = (os.environ if environ is None else environ).get("DATA_DIR")
        self.data_dir = given or str(root / "data")

    def environment(self, job: Job) -> dict[str, str]:
        """What every process of `job` gets: the run's own folders, port and label."""
        return {
            **self.base,
            "PYTHONUNBUFFERED": "1",
            "FEDSIM_ENV_FILE": os.devnull,
            "DATA_DIR": self.data_dir,
            "MODEL_DIR": str(job.folder / "models"),
            "TOKENS_FILE": str(job.folder / "models" / "tokens.json"),
            "WORKER_STATE_DIR": str(job.folder / "worker-state"),  # COMPRESSION=topk residuals
            # SECAGG: the workers' secret, beside the run's models, not in them.
            "SECAGG_KEY_FILE": str(job.folder / "worker-secrets" / "secagg.key"),
            "AGGREGATOR_URL": f"http://127.0.0.1:{free_port()}",
            **job.settings,
            "RUN_LABEL": job.label,
        }

    def prepare(self) -> None:
        """Nothing to build for local runs."""

    def run(self, job: Job, on_entry: Callable[[dict[str, Any]], None]) -> Raw:
        env = self.environment(job)
        job.logs.mkdir(parents=True, exist_ok=True)
        model_dir = Path(env["MODEL_DIR"])
        started, clock = time.time(), time.monotonic()
        load_start = load()
        python = sys.executable
        log = job.logs / "prepare.log"
        with log.open("wb") as out:
            done = subprocess.run(
                [python, "-m", "fedsim.prepare"],
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if done.returncode != 0:
            raise RunFailed(f"prepare exited {done.returncode} ({log}): {tail(log)}")
        port = env["AGGREGATOR_URL"].rsplit(":", 1)[1]
        procs: list[subprocess.Popen] = []
        try:
            aggregator = start(
                [python, "-m", "gunicorn", "-c", "python:fedsim.aggregator.gunicorn_conf",
                 "fedsim.aggregator.app:create_app()"],
                # Not told where the workers' secret is: it never reads it (docs/secagg.md).
                env=preloaded({**{k: v for k, v in env.items() if k != "SECAGG_KEY_FILE"},
                                   "BIND": f"127.0.0.1:{port}"}, JEMALLOC),
                log=job.logs / "aggregator.log",
                cwd=self.root,
            )  # fmt: skip
            procs.append(aggregator)
            self._wait_healthy(env["AGGREGATOR_URL"], aggregator, job.logs / "aggregator.log")
            workers = [
                start(
                    [python, "-m", "fedsim.client"],
                    env=preloaded(env, TCMALLOC),  # as in the client image
                    log=job.logs / f"worker-{i}.log",
                    cwd=self.root,
                )
                for i in range(1, job.workers + 1)
            ]
            procs += workers
            names = {"aggregator": aggregator.pid}
            names.update({f"worker-{i}": w.pid for i, w in enumerate(workers, 1)})

            def finished() -> bool:
                if aggregator.poll() is not None:
                    path = job.logs / "aggregator.log"
                    raise RunFailed(
                        f"the aggregator exited {aggregator.returncode} ({path}): {tail(path)}"
                    )
                codes = [w.poll() for w in workers]
                for i, code in enumerate(codes, 1):
                    if code not in (None, 0):
                        path = job.logs / f"worker-{i}.log"
                        raise RunFailed(f"worker-{i} exited {code} ({path}): {tail(path)}")
                return all(code == 0 for code in codes)

            answers = Answers(env["AGGREGATOR_URL"], get, every=ANSWERS_SECONDS)
            status, entries, memory_at, seconds, peak = watch(
                job, model_dir, names, finished, on_entry, clock, answers
            )
            answers.poll()  # the answers' sizes at the run's end, its history the longest
            metrics = get(env["AGGREGATOR_URL"] + "/metrics") or b""
        finally:
            for proc in reversed(procs):  # the workers first, then the aggregator
                stop(proc)
        entries = read_history(model_dir / "history.jsonl") or entries
        raw = Raw(
            status=status,
            started=started,
            seconds=seconds,
            entries=entries,
            memory_at=memory_at,
            peak_memory=peak,
            worker_logs="".join(
                (job.logs / f"worker-{i}.log").read_text(errors="replace")
                for i in range(1, job.workers + 1)
            ),
            aggregator_log=(job.logs / "aggregator.log").read_text(errors="replace"),
            metrics=metrics.decode("utf-8", "replace"),
            status_bytes=answers.status_bytes,
            history_bytes=answers.history_bytes,
            load_start=load_start,
            load_end=load(),
        )
        shutil.rmtree(model_dir, ignore_errors=True)  # checkpoints: megabytes a run
        shutil.rmtree(env["WORKER_STATE_DIR"], ignore_errors=True)  # top-k residuals likewise
        return raw

    @staticmethod
    def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
        deadline = time.monotonic() + HEALTH_SECONDS
        while get(url + "/healthz", timeout=2) is None:
            if proc.poll() is not None:
                raise RunFailed(f"the aggregator exited {proc.returncode} ({log}): {tail(log)}")
            if time.monotonic() > deadline:
                raise RunFailed(f"no answer from {url}/healthz in {HEALTH_SECONDS} s ({log})")
            time.sleep(0.3)


class KerasEngine(LocalEngine):
    """The floor: the same cell trained by plain Keras (experiment/floor.py, in one process or
    the experiment's floor_processes), measured as a federated run is, so a sweep pairs
    fedsim with what it adds to training."""

    name = "keras"

    def run(self, job: Job, on_entry: Callable[[dict[str, Any]], None]) -> Raw:
        env = self.environment(job)
        job.logs.mkdir(parents=True, exist_ok=True)
        model_dir = Path(env["MODEL_DIR"])
        log = job.logs / "floor.log"
        started, clock = time.time(), time.monotonic()
        load_start = load()
        proc = start(
            [sys.executable, "-m", "fedsim.experiment.floor", "--processes", str(job.workers)],
            env=env,
            log=log,
            cwd=self.root,
        )

        def finished() -> bool:
            code = proc.poll()
            if code not in (None, 0):
                raise RunFailed(f"the keras floor exited {code} ({log}): {tail(log)}")
            return code == 0

        try:
            status, entries, memory_at, seconds, peak = watch(
                job, model_dir, {"floor": proc.pid}, finished, on_entry, clock
            )
        finally:
            stop(proc)
        raw = Raw(
            status=status,
            started=started,
            seconds=seconds,
            entries=read_history(model_dir / "history.jsonl") or entries,
            memory_at=memory_at,
            peak_memory=peak,
            worker_logs=log.read_text(errors="replace"),
            load_start=load_start,
            load_end=load(),
        )
        shutil.rmtree(model_dir, ignore_errors=True)
        return raw
