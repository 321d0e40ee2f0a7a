"""A stand-in aggregator under a real gunicorn on 127.0.0.1, the proxy (deploy/nginx) in
front of it, and uploaders that load it.

The model folder holds checkpoint 0 of the mlp (or another model) and the partition plan
of its settings made from stand-in labels, so neither TensorFlow nor MNIST is needed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import requests

from fedsim import checkpoints, config, tokens
from fedsim.data import partition
from fedsim.models import SHAPES

from .procs import free_port, start

NGINX_ENTRYPOINT = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "entrypoint.sh"
ID_WIDTH = 32  # update ids are patched into one pre-encoded body, so they share a width
TRAIN_IMAGES = 60_000  # MNIST's training set, which the stand-in labels cover
LABELS = (np.arange(TRAIN_IMAGES) % 10).astype(np.uint8)  # stand-in labels: 0-9 in turn


def model_weights(model: str, seed: int) -> dict[str, np.ndarray]:
    """Seeded float32 tensors of `model`'s layout, of the size of trained weights."""
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) * 0.05 for n, s in SHAPES[model]}


def mlp_weights(seed: int) -> dict[str, np.ndarray]:
    return model_weights("mlp", seed)


def stand_in(tmp: Path, model: str = "mlp", **settings: str) -> dict[str, str]:
    """Checkpoint 0 of `model`, the partition plan and a tokens file in `tmp`; the settings
    to serve them (`settings` added, e.g. NUM_CLIENTS="100")."""
    model_dir = tmp / "models"
    checkpoints.save(model_dir, 0, model_weights(model, 0), {"samples": 0, "model": model}, keep=5)
    env = {
        "MODEL_DIR": str(model_dir),
        "MODEL": model,
        "FEDSIM_ENV_FILE": str(tmp / "no.env"),
        "TOKENS_FILE": str(tmp / "secrets" / "tokens.json"),
        # The benches push every update as client-1: a window of one version (each update
        # makes one) lets it add its partition's samples each time, so the quota never binds.
        "CLIENT_QUOTA_VERSIONS": "1",
        **settings,
    }
    loaded = config.load(environ=env, env_file=tmp / "no.env")
    plan = partition.plan_settings(loaded)
    partition.write(model_dir, partition.manifest(plan, partition.make(plan, LABELS), LABELS))
    tokens.ensure(Path(env["TOKENS_FILE"]))
    return env


def workers_header(env: dict[str, str]) -> dict[str, str]:
    """The workers' Authorization header from the stand-in's tokens file."""
    return {"Authorization": f"Bearer {tokens.workers_secret(Path(env['TOKENS_FILE']))}"}


def start_gunicorn(
    tmp: Path, env: dict[str, str], threads: int, profile: Path | None = None
) -> tuple[subprocess.Popen, str, Path]:
    """The aggregator as the image runs it (1 worker x `threads`); process, URL and log.
    With `profile`, its request threads under cProfile, written there at its exit."""
    port = free_port()
    log = tmp / "gunicorn.log"
    gunicorn = Path(sys.executable).with_name("gunicorn")
    conf = "benchlib.gunicorn_profile" if profile else "fedsim.aggregator.gunicorn_conf"
    argv = [gunicorn, "-c", f"python:{conf}", "fedsim.aggregator.app:create_app()"]
    full = {**os.environ, **env, "BIND": f"127.0.0.1:{port}", "THREADS": str(threads)}
    if profile is not None:
        scripts = str(Path(__file__).resolve().parents[1])  # benchlib's folder's parent
        path = os.pathsep.join(p for p in (scripts, os.environ.get("PYTHONPATH", "")) if p)
        full |= {"FEDSIM_PROFILE_OUT": str(profile), "PYTHONPATH": path}
    return start(argv, env=full, log=log, cwd=tmp), f"http://127.0.0.1:{port}", log


def nginx_missing() -> str | None:
    """Why the proxy cannot start here (nginx is Debian's package), or None."""
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        return "nginx not found: apt-get install -y nginx (Debian's package)"
    return None


def start_nginx(tmp: Path, upstream: str, tls: bool = False) -> tuple[subprocess.Popen, str]:
    """The proxy as its image runs it (deploy/nginx/entrypoint.sh) in front of `upstream`;
    its process and URL. With `tls`, the certificates in tmp/certs (scripts/make-certs.sh)."""
    port = free_port()
    name = "nginx-tls" if tls else "nginx"
    env = {
        **os.environ,
        "NGINX_PREFIX": str(tmp / name),
        "LISTEN_PORT": str(port),
        "UPSTREAM": upstream.removeprefix("http://"),
        "TLS": str(tls).lower(),
        "CERT_DIR": str(tmp / "certs"),
        "NGINX_USER": "root",  # used only when this runs as root: no other user is needed
    }
    proc = subprocess.Popen(
        [str(NGINX_ENTRYPOINT)],
        env=env,
        stdout=(tmp / f"{name}.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    return proc, f"{'https' if tls else 'http'}://127.0.0.1:{port}"


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, ca: str = "") -> None:
    """Until GET /healthz answers 200; stops the benchmark with the log if it never does."""
    for _ in range(300):
        if proc.poll() is not None:
            raise SystemExit(f"{log.name}: exited {proc.returncode}\n{log.read_text()}")
        try:
            if requests.get(url + "/healthz", timeout=2, verify=ca or True).status_code == 200:
                return
        except requests.RequestException:  # not up yet, or slow to answer on a busy machine
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} never became healthy\n{log.read_text()}")


def uploads(job: tuple[str, int, float, bytes, str, dict[str, str], str]) -> tuple[int, int]:
    """One uploader: post `body` with a fresh update id each time until the deadline;
    (accepted, other answers). Ids are `prefix`, the uploader's number, a counter."""
    url, k, deadline, body, prefix, headers, verify = job
    template = bytearray(body)
    at = template.index(b"0" * ID_WIDTH)
    width = ID_WIDTH - len(prefix) - 4
    session = requests.Session()
    accepted = other = i = 0
    while time.time() < deadline:
        i += 1
        template[at : at + ID_WIDTH] = f"{prefix}{k:04d}{i:0{width}d}".encode()
        response = session.post(
            url + "/v1/updates",
            data=bytes(template),
            headers=headers,
            timeout=30,
            verify=verify or True,  # per request: REQUESTS_CA_BUNDLE would beat Session.verify
        )
        if response.status_code == 200 and not response.json()["duplicate"]:
            accepted += 1
        else:
            other += 1
    return accepted, other


def for_seconds(
    target: Callable[[tuple], tuple[int, int]], processes: int, seconds: float, *job: Any
) -> tuple[int, int]:
    """`target((job[0], k, deadline, *job[1:]))` in `processes` forked processes for
    `seconds`, started together half a second from now; the summed (ok, other)."""
    with mp.get_context("fork").Pool(processes) as pool:
        deadline = time.time() + 0.5 + seconds  # every process imported and connected first
        jobs = [(job[0], k, deadline, *job[1:]) for k in range(processes)]
        counts = pool.map_async(target, jobs).get(timeout=seconds + 120)
    return sum(c[0] for c in counts), sum(c[1] for c in counts)
