"""The Compose engine: a run as a Docker Compose project of its own.

Each run is `docker compose up -d --scale client=N` in the project folder under
its own project name (so its own models volume) and its own host port, with its
settings in an env file of its own (`--env-file`: the project's `.env` is not
read, and the caller's environment keeps no fedsim setting). The images are
built once per sweep. The history (a page at a time after the status, as the
dashboard reads it: answers.py) and metrics are read over HTTP through the
proxy, the memory is each of the project's containers' (`docker stats`), and
the project is taken down with its volumes at the end of the run.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedsim.experiment.answers import Answers
from fedsim.experiment.local import clean_environ, get
from fedsim.experiment.outcome import Raw
from fedsim.experiment.procs import PeakMemory, free_port
from fedsim.experiment.watch import Job, RunFailed, follow, load

RESET = ("--profile", "*", "down", "-v", "--remove-orphans", "--timeout", "10")
UNITS = {"B": 1, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}
HEALTH_SECONDS = 300


def container_memory(stats: str, project: str) -> dict[str, int]:
    """`docker stats`' "name<TAB>usage" lines -> {name less the "<project>-": bytes}; a
    container that stopped meanwhile ("--") is left out."""
    out = {}
    for line in stats.splitlines():
        name, _, usage = line.partition("\t")
        if usage and name.strip() not in ("", "--"):
            out[name.strip().removeprefix(f"{project}-")] = memory_bytes(usage)
    return out


def memory_bytes(usage: str) -> int:
    """`docker stats`' "123.4MiB / 23.4GiB" -> 129394278 (the part before the slash)."""
    match = re.match(r"\s*([0-9.]+)\s*([A-Za-z]+)", usage)
    if not match:
        return 0
    return round(float(match.group(1)) * UNITS.get(match.group(2).upper(), 1))


class ComposeEngine:
    name = "compose"

    def __init__(self, root: Path, environ: Mapping[str, str] | None = None) -> None:
        self.root = root  # the folder of compose.yaml, with ./data
        self.environ = clean_environ(environ)

    def _run(
        self, *args: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            args,
            cwd=self.root,
            env=self.environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            last = " | ".join(done.stdout.strip().splitlines()[-5:])
            raise RunFailed(f"`{' '.join(args[:4])} ...` exited {done.returncode}: {last}")
        return done

    def prepare(self) -> None:
        """Build the images once for the whole sweep."""
        self._run("docker", "compose", "build", timeout=3600)

    def env_file(self, job: Job, port: int) -> Path:
        lines = {
            "AGGREGATOR_PORT": str(port),
            "AGGREGATOR_HOST": "127.0.0.1",
            **job.settings,
            "RUN_LABEL": job.label,
        }
        path = job.folder / "compose.env"
        path.write_text("".join(f"{k}={json.dumps(v)}\n" for k, v in lines.items()))
        return path

    def run(self, job: Job, on_entry: Callable[[dict[str, Any]], None]) -> Raw:
        job.logs.mkdir(parents=True, exist_ok=True)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        project = f"fedsim-exp-{secrets.token_hex(4)}"
        (job.folder / "compose.project").write_text(project + "\n")
        compose = ("docker", "compose", "-p", project, "--env-file", str(self.env_file(job, port)))
        started, clock = time.time(), time.monotonic()
        load_start = load()
        try:
            self._run(*compose, "up", "-d", "--no-build", "--scale", f"client={job.workers}")
            deadline = time.monotonic() + HEALTH_SECONDS
            while get(url + "/healthz", timeout=2) is None:
                if time.monotonic() > deadline:
                    raise RunFailed(f"no answer from {url}/healthz in {HEALTH_SECONDS} s")
                time.sleep(1)

            answers = Answers(url, get)  # the status, then the history's new page

            def finished() -> bool:
                out = self._run(*compose, "ps", "-a", "--format", "json", "client").stdout
                found = [json.loads(line) for line in out.splitlines() if line.strip()]
                if found and isinstance(found[0], list):  # older Compose prints one array
                    found = found[0]
                codes = [c.get("ExitCode") for c in found if c.get("State") == "exited"]
                if any(code not in (0, None) for code in codes):
                    logs = self._run(*compose, "logs", "--no-color", "client", check=False)
                    (job.logs / "workers.log").write_text(logs.stdout)
                    raise RunFailed(f"a worker exited {codes} ({job.logs / 'workers.log'})")
                return len(found) == job.workers and len(codes) == job.workers

            with PeakMemory(lambda: self._memory(compose, project), every=2.0) as memory:
                status, found, memory_at = follow(
                    job,
                    entries=answers.entries,
                    done=finished,
                    memory=lambda: memory.parts,
                    on_entry=on_entry,
                )
                seconds = time.monotonic() - clock
                answers.drain()  # the whole history, and the answers' sizes at the end
                found = answers.history() or found
                metrics = get(url + "/metrics") or b""
            workers_log = self._run(*compose, "logs", "--no-color", "client", check=False).stdout
            aggregator_log = self._run(
                *compose, "logs", "--no-color", "aggregator", check=False
            ).stdout
            (job.logs / "workers.log").write_text(workers_log)
            (job.logs / "aggregator.log").write_text(aggregator_log)
        finally:
            self._run(*compose, *RESET, check=False, timeout=300)
        return Raw(
            status=status,
            started=started,
            seconds=seconds,
            entries=found,
            memory_at=memory_at,
            peak_memory=memory.peak,
            worker_logs=workers_log,
            aggregator_log=aggregator_log,
            metrics=metrics.decode("utf-8", "replace"),
            status_bytes=answers.status_bytes,
            history_bytes=answers.history_bytes,
            load_start=load_start,
            load_end=load(),
        )

    def _memory(self, compose: tuple[str, ...], project: str) -> dict[str, int]:
        """The memory in use by each of the project's containers now, by service and number
        ("aggregator-1", "client-2"; the project's name left out)."""
        ids = self._run(*compose, "ps", "-q", check=False).stdout.split()
        if not ids:
            return {}
        out = self._run(
            "docker",
            "stats",
            "--no-stream",
            "--format",
            "{{.Name}}\t{{.MemUsage}}",
            *ids,
            check=False,
        ).stdout
        return container_memory(out, project)
