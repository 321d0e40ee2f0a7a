"""End-to-end tests that run the Docker Compose simulation for real.

Each test works in its own copy of the project (compose.yaml, Dockerfiles, the
package, scripts) under a temporary folder, with its own `.env`, its own
./data, its own Compose project name `fedsim-test-<random>` and its own host
port, and removes its containers, network and volumes afterwards even when it
fails. The two images are built once per session and shared by the tests.

In CI (`CI=true`) they must run, and fail when there is no Docker engine;
elsewhere they skip with the reason when `docker info` fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from docker_helpers import (
    COMPOSE_RESET,
    MNIST_FILES,
    ProjectCopy,
    docker_info,
    evaluation_report,
    free_port,
    leftovers,
    projects,
    worker_summary,
)

pytestmark = pytest.mark.docker

# Small settings: six slices of 2,000 images, two epochs each, about a minute a run.
SMALL = {"NUM_IMAGES_TRAIN": "2000", "CLIENT_SLICES": "1-2 3-4 5-6", "EPOCHS": "2"}
RUN_TIMEOUT = 600  # seconds for one run of the clients; a run takes about one minute


@pytest.fixture(scope="session")
def docker_engine() -> None:
    docker_info()


class Project(ProjectCopy):
    """One Compose project in its own folder: `.env`, ./data, ./reports."""

    def compose(self, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
        return self.run("docker", "compose", *args, **kwargs)

    def containers(self, service: str) -> list[dict]:
        """`docker compose ps -a` of one service, as dicts (Name, State, ExitCode)."""
        out = self.compose("ps", "-a", "--format", "json", service).stdout.strip()
        if not out:
            return []
        if out.startswith("["):  # older Compose prints one array
            return json.loads(out)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait_exited(self, service: str, count: int, timeout: float = RUN_TIMEOUT) -> list[dict]:
        """Wait until `count` containers of `service` have exited for good.

        A container in its restart policy's back-off shows as `restarting`, so
        waiting for `exited` also waits out a failing replica's retries.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = self.containers(service)
            if len(found) == count and all(c["State"] == "exited" for c in found):
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{service} did not finish in {timeout} s: {found}\n{self.logs()}"
                )
            time.sleep(2)

    def logs(self, service: str = "") -> str:
        args = ["logs", "--no-color", "--timestamps"] + ([service] if service else [])
        return self.compose(*args, check=False).stdout

    def container_logs(self, name: str) -> str:
        return self.run("docker", "logs", name, check=False).stdout

    def status(self) -> dict:
        url = f"http://127.0.0.1:{self.port}/v1/status"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            found = self.containers("aggregator")
            if found and found[0].get("Health") == "healthy":
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"aggregator not healthy in {timeout} s:\n{self.logs()}")
            time.sleep(1)

    def down(self) -> None:
        """The documented reset: every profile's containers, the networks and the volumes."""
        self.compose(*COMPOSE_RESET, "--timeout", "10", check=False, timeout=180)


@pytest.fixture(scope="session")
def images(docker_engine, tmp_path_factory) -> None:
    """Build both images once; the tests' projects reuse them (and their cache)."""
    project = Project(tmp_path_factory.mktemp("build"), {})
    try:
        project.compose("--profile", "tools", "build", timeout=1800)
    finally:
        project.down()


@pytest.fixture
def project(images, tmp_path) -> Iterator[Callable[[dict[str, str]], Project]]:
    yield from projects(tmp_path, Project)


def _get(p: Project, path: str, port: int | None = None) -> tuple[int, bytes]:
    url = f"http://127.0.0.1:{port or p.port}{path}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read()


# --- (a) a run, evaluation, and a second run that resumes ----------------------------


def test_compose_run_trains_evaluates_and_resumes(project, mnist_dir):
    p = project(SMALL)
    p.add_mnist(mnist_dir)

    p.compose("up", "-d", "--build", "--scale", "client=3")
    clients = p.wait_exited("client", 3)
    assert [c["ExitCode"] for c in clients] == [0, 0, 0], p.logs()

    # Each worker kept one logical client for the whole run, as the original replicas.
    logs = "".join(p.container_logs(c["Name"]) for c in clients)
    for k, (first, last) in enumerate([(1, 2), (3, 4), (5, 6)], start=1):
        samples = f"samples {(first - 1) * 2000}-{last * 2000 - 1}"
        assert f"client-{k}: slices {first}-{last} ({samples})" in logs, logs
    for c in clients:
        summary = worker_summary(p.container_logs(c["Name"]))
        assert summary["trained"] == 2 and summary["accepted"] == 2, summary
    # The client image preloads tcmalloc, and each worker says so in its first lines.
    assert logs.count("memory allocator: tcmalloc") == 3, logs

    status = p.status()  # the aggregator keeps serving after the workers are done
    assert status["version"] == 6 and status["samples"] == 12_000, status
    assert status["strategy"] == "async-weighted" and status["finished"] is True
    # Scored at versions 0, 3 and 6 (EVAL_EVERY: one round's worth of 3 clients).
    history = json.loads(_get(p, "/v1/history")[1])["history"]
    assert [e["version"] for e in history] == [0, 3, 6], history
    # The dashboard and the metrics are served beside the API.
    code, page = _get(p, "/")
    assert code == 200 and b"fedsim" in page
    assert b"fedsim_model_version 6.0" in _get(p, "/metrics")[1]
    assert p.containers("aggregator")[0]["State"] == "running"
    aggregator_log = p.logs("aggregator")
    # SAVE_MODEL=2: a checkpoint every two accepted updates.
    assert "checkpoint v6 written" in aggregator_log, aggregator_log

    evaluation = p.run("scripts/evaluate.sh", timeout=300)
    accuracy, report = evaluation_report(evaluation.stdout, p.folder)
    print(f"accuracy after 6 updates: {accuracy:.4f}")
    assert accuracy >= 0.90, evaluation.stdout
    assert [e["version"] for e in report["history"]] == [0, 3, 6]
    pngs = sorted(f.name.split("Z-")[-1] for f in (p.folder / "reports").glob("*.png"))
    assert pngs == ["clients.png", "confusion.png", "learning-curve.png"], evaluation.stdout

    # `down` keeps the models volume; `up` again resumes the finished run: the
    # workers find nothing to do and leave, and nothing is trained twice.
    p.compose("down", "--timeout", "20")
    p.compose("up", "-d", "--scale", "client=3")
    clients = p.wait_exited("client", 3)
    assert [c["ExitCode"] for c in clients] == [0, 0, 0], p.logs()
    assert re.search(r"resumed from /models/ckpt-6\.safetensors: version 6\b", p.logs("aggregator"))
    assert p.status()["version"] == 6 and p.status()["updates"] == 6


# --- (b) the aggregator crashes in the middle of a run ----------------------------------


def _crash(p: Project) -> str:
    """SIGKILL the aggregator's main process, as an out-of-memory kill would.

    Docker's restart policy (unless-stopped) brings it back. When the engine's
    processes are not visible from here, fall back to `docker compose kill`,
    after which Docker deliberately does not restart, so start it again.
    """
    container = f"{p.name}-aggregator-1"
    pid = int(p.run("docker", "inspect", "-f", "{{.State.Pid}}", container).stdout)
    try:
        os.kill(pid, signal.SIGKILL)
        return "restart policy"
    except (PermissionError, ProcessLookupError):
        p.compose("kill", "aggregator")
        p.compose("start", "aggregator")
        return "docker compose start"


def test_aggregator_crash_mid_run(project, mnist_dir):
    # Enough retries to ride out the restart; twelve updates, SAVE_MODEL=2.
    settings = {**SMALL, "CLIENT_SLICES": "1-4 5-8 9-12", "MAX_RETRY": "30", "MAX_WAIT": "1"}
    p = project(settings)
    p.add_mnist(mnist_dir)
    # One worker more than there are logical clients: it leaves, saying so.
    p.compose("up", "-d", "--scale", "client=4")

    # Crash just after version 3: v2 is in a checkpoint, v3 (usually) not yet.
    deadline = time.monotonic() + RUN_TIMEOUT
    while not re.search(r"-> v3,", p.logs("aggregator")):
        assert time.monotonic() < deadline, p.logs()
        time.sleep(0.3)
    how = _crash(p)
    p.wait_healthy()

    clients = {c["Name"]: c for c in p.wait_exited("client", 4)}
    assert [c["ExitCode"] for c in clients.values()] == [0, 0, 0, 0], p.logs()
    logs = {name: p.container_logs(name) for name in clients}
    assert any("no work for this worker" in log for log in logs.values()), logs

    # The aggregator came back from its newest checkpoint, not from version 0.
    aggregator_log = p.logs("aggregator")
    runs = aggregator_log.split("resumed from ")
    assert len(runs) == 3, f"expected two starts ({how}):\n{aggregator_log}"
    before_crash = [int(v) for v in re.findall(r"-> v(\d+),", runs[1])]
    resumed = int(re.match(r"\S+: version (\d+)", runs[2]).group(1))
    assert resumed >= 1 and resumed <= max(before_crash), aggregator_log
    unsaved = max(before_crash) - resumed  # accepted, but not in a checkpoint at the kill

    # Nothing lost, nothing counted twice: async-weighted makes one version per
    # aggregated update, each of 2,000 samples, and each of the 12 slices is in the
    # model exactly once (the workers pushed the lost ones again). A slice may have
    # been trained twice: the restarted aggregator does not know which worker held
    # it, and gives it out again; the second push is answered "already counted".
    status = p.status()
    summaries = [worker_summary(log) for log in logs.values()]
    trained = sum(s["trained"] for s in summaries)
    repushed = sum(s["repushed"] for s in summaries)
    assert trained >= 12 and all(s["failed"] == 0 for s in summaries), summaries
    assert status["updates"] == 12, (status, summaries, aggregator_log)
    assert status["version"] == status["updates"], status
    assert status["samples"] == 2000 * status["updates"], status
    assert status["unsaved_updates"] == 0, status  # the workers waited for the checkpoint
    assert repushed <= unsaved, (summaries, unsaved)
    ids = [h["update_id"] for h in status["history"]]
    assert len(ids) == len(set(ids)), ids
    print(
        f"crash at v{max(before_crash)}, back by {how} from checkpoint v{resumed} "
        f"({unsaved} unsaved updates); clients re-pushed {repushed}; "
        f"final version {status['version']}, {status['updates']} updates of {trained} slices"
    )


def test_killed_every_few_seconds_the_run_completes_with_every_update_once(project, mnist_dir):
    # SAVE_MODEL=1: a checkpoint after every update, so nearly every kill loses little,
    # and the kills land at every stage: in a write, between an answer and its save...
    settings = {**SMALL, "SAVE_MODEL": "1", "MAX_RETRY": "30", "MAX_WAIT": "1"}
    p = project(settings)
    p.add_mnist(mnist_dir)
    p.compose("up", "-d", "--scale", "client=3")
    p.wait_healthy()
    kills = 0
    deadline = time.monotonic() + RUN_TIMEOUT
    while kills < 6 and time.monotonic() < deadline:
        if all(c["State"] == "exited" for c in p.containers("client")):
            break
        time.sleep(4)
        if p.containers("aggregator")[0]["State"] == "running":
            _crash(p)
            kills += 1
            p.wait_healthy()
    clients = p.wait_exited("client", 3)
    assert [c["ExitCode"] for c in clients] == [0, 0, 0], p.logs()
    status = p.status()
    # Six slices of 2,000 images, each aggregated exactly once however often it was pushed.
    assert (status["updates"], status["version"], status["samples"]) == (6, 6, 12_000), status
    assert status["finished"] is True and status["unsaved_updates"] == 0, status
    logs = "".join(p.container_logs(c["Name"]) for c in clients)
    counted = [
        line
        for line in logs.splitlines()
        if re.search(r" (re-)?push.* -> version \d+", line) and "already counted" not in line
    ]
    assert len(counted) >= 6, logs
    print(f"{kills} kills; {len(counted)} pushes answered as new, 6 updates aggregated")


# --- (c) logical clients on a pool of workers, rounds, and the monitoring profile ------


def test_iid_clients_in_rounds_on_two_workers_with_prometheus(project, mnist_dir):
    settings = {
        "PARTITION": "iid",
        "NUM_CLIENTS": "10",
        "CLIENTS_PER_ROUND": "5",
        "AGGREGATION": "fedavg",
        "ROUNDS": "3",
        "EPOCHS": "1",
        "PROMETHEUS_PORT": str(free_port()),
    }
    p = project(settings)
    p.add_mnist(mnist_dir)
    p.compose("--profile", "monitoring", "up", "-d", "--build", "--scale", "client=2")
    clients = p.wait_exited("client", 2)
    assert [c["ExitCode"] for c in clients] == [0, 0], p.logs()
    summaries = [worker_summary(p.container_logs(c["Name"])) for c in clients]
    assert sum(s["trained"] for s in summaries) == 15, summaries  # 3 rounds x 5 clients
    status = p.status()
    assert (status["version"], status["updates"], status["finished"]) == (3, 15, True), status
    history = json.loads(_get(p, "/v1/history")[1])["history"]
    assert [(e["version"], e["round"]) for e in history] == [(0, None), (1, 1), (2, 2), (3, 3)]
    assert history[-1]["accuracy"] > 0.8, history
    # Prometheus scrapes the aggregator: its target is up.
    port = int(settings["PROMETHEUS_PORT"])
    deadline = time.monotonic() + 120
    while True:
        try:
            targets = json.loads(_get(p, "/api/v1/targets", port)[1])["data"]["activeTargets"]
        except OSError:
            targets = []
        if any(t["health"] == "up" for t in targets):
            break
        assert time.monotonic() < deadline, (targets, p.logs("prometheus"))
        time.sleep(2)


# --- (d) bad settings and missing data stop `docker compose up` with the message -------


def test_bad_env_value_stops_compose_up(project):
    p = project({**SMALL, "MAX_RETRY": "zero"})
    # Attached, as a user runs it: prepare fails first, and `up` stops there.
    result = p.compose("up", "--scale", "client=3", check=False, timeout=300)
    assert result.returncode != 0, result.stdout
    assert "invalid setting MAX_RETRY='zero': an integer >= 1" in result.stdout, result.stdout
    assert 'service "prepare" didn\'t complete successfully' in result.stdout, result.stdout
    assert all(c["State"] == "created" for c in p.containers("aggregator")), result.stdout
    print(result.stdout)


def test_the_tokens_file_is_the_services_users_alone(project, mnist_dir):
    p = project(SMALL)
    p.add_mnist(mnist_dir)
    tokens_file = p.folder / "secrets" / "tokens.json"

    p.compose("run", "--rm", "prepare", timeout=600)
    info = tokens_file.stat()
    # 0600 and owned by the images' user (UID 10001 in both): no other user of the host
    # reads the workers' token.
    assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o600, 10001), info
    # A token added the documented way stays so, and the non-root aggregator reads it.
    p.compose("run", "--rm", "prepare", "python", "-m", "fedsim.tokens", "add", "alice")
    info = tokens_file.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o600, 10001), info
    p.compose("up", "-d", "aggregator")
    p.wait_healthy()
    listed = p.compose("exec", "-T", "aggregator", "python", "-m", "fedsim.tokens", "list")
    assert "alice: alice" in listed.stdout and "workers: *" in listed.stdout, listed.stdout
    # The image's allocator, as its aggregator says and as its process has it mapped.
    logs = p.compose("logs", "aggregator").stdout
    assert "memory allocator: jemalloc (MALLOC_CONF=narenas:1)" in logs, logs
    maps = p.compose("exec", "-T", "aggregator", "cat", "/proc/1/maps").stdout
    assert "/libjemalloc.so.2" in maps, maps[:2000]


def test_missing_data_stops_compose_up_with_where_to_put_it(project):
    # ./data empty and no mirror reachable (port 9 on the container itself refuses).
    p = project({**SMALL, "MNIST_MIRRORS": "http://127.0.0.1:9/"})
    result = p.compose("up", "--scale", "client=3", check=False, timeout=300)
    assert result.returncode != 0, result.stdout
    message = next(
        (line for line in result.stdout.splitlines() if "could not download" in line), ""
    )
    for name in MNIST_FILES:
        assert name in message, result.stdout
    assert "in /data" in message, result.stdout
    # Compose creates the containers up front; none may have started.
    assert all(c["State"] == "created" for c in p.containers("client")), result.stdout
    assert all(c["State"] == "created" for c in p.containers("aggregator")), result.stdout
    print(result.stdout)


# --- (e) the reset leaves nothing behind, profiles included ------------------------------


def test_reset_leaves_no_container_network_or_volume_of_the_project(project, mnist_dir):
    # One short run with the monitoring profile: Prometheus outlived `down -v` once.
    settings = {**SMALL, "CLIENT_SLICES": "1-1", "EPOCHS": "1", "PROMETHEUS_PORT": str(free_port())}
    p = project(settings)
    p.add_mnist(mnist_dir)
    p.compose("--profile", "monitoring", "up", "-d", "--scale", "client=1")
    clients = p.wait_exited("client", 1)
    assert [c["ExitCode"] for c in clients] == [0], p.logs()
    label = f"com.docker.compose.project={p.name}"
    prometheus = p.run(
        "docker",
        "ps",
        "-q",
        "--filter",
        f"label={label}",
        "--filter",
        "label=com.docker.compose.service=prometheus",
    ).stdout.split()
    assert len(prometheus) == 1, p.logs()
    before = leftovers(label)
    assert before["containers"] and before["networks"] and before["volumes"], before

    p.down()

    assert leftovers(label) == {"containers": [], "networks": [], "volumes": []}


def test_compose_run_with_central_dp_ends_with_epsilon_in_the_report(project, mnist_dir):
    settings = {
        "PARTITION": "iid",
        "NUM_CLIENTS": "10",
        "CLIENTS_PER_ROUND": "5",
        "AGGREGATION": "fedavg",
        "ROUNDS": "3",
        "EPOCHS": "1",
        "DP": "central",
        "DP_CLIP": "1",
        "DP_NOISE": "1",
    }
    p: Project = project(settings)
    p.add_mnist(mnist_dir)
    p.compose("up", "-d", "--build", "--scale", "client=2")
    clients = p.wait_exited("client", 2)
    assert [c["ExitCode"] for c in clients] == [0, 0], p.logs()
    status = p.status()
    assert (status["version"], status["finished"]) == (3, True), status
    privacy = status["privacy"]
    assert privacy["mode"] == "central" and privacy["rounds_composed"] == 3, privacy
    assert privacy["epsilon"] > 0, privacy
    history = json.loads(_get(p, "/v1/history")[1])["history"]
    assert [e["round"] for e in history] == [None, 1, 2, 3], history
    assert history[-1]["epsilon"] == pytest.approx(privacy["epsilon"]), history
    metrics = _get(p, "/metrics")[1].decode()
    assert re.search(r"^fedsim_dp_epsilon \d", metrics, re.M), metrics
    evaluation = p.run("scripts/evaluate.sh", timeout=300)
    shown = re.search(
        r"^privacy: ε = (\d+\.\d+) at δ = \S+ after round 3 \(version 3\)$", evaluation.stdout, re.M
    )
    assert shown, evaluation.stdout
    assert float(shown.group(1)) == pytest.approx(privacy["epsilon"], abs=1e-3)
    report = json.loads(next((p.folder / "reports").glob("evaluation-*.json")).read_text())
    assert report["privacy"]["epsilon"] == pytest.approx(privacy["epsilon"])


def test_compose_run_with_topk_keeps_residuals_in_the_shared_volume(project, mnist_dir):
    settings = {
        "PARTITION": "iid",
        "NUM_CLIENTS": "10",
        "CLIENTS_PER_ROUND": "5",
        "AGGREGATION": "fedavg",
        "ROUNDS": "3",
        "EPOCHS": "1",
        "COMPRESSION": "topk",
        "COMPRESSION_DOWN": "fp16",
    }
    p: Project = project(settings)
    p.add_mnist(mnist_dir)
    p.compose("up", "-d", "--build", "--scale", "client=2")
    clients = p.wait_exited("client", 2)
    assert [c["ExitCode"] for c in clients] == [0, 0], p.logs()
    status = p.status()
    assert (status["version"], status["updates"], status["finished"]) == (3, 15, True), status
    logs = "".join(p.container_logs(c["Name"]) for c in clients)
    assert len(re.findall(r" push  base \d+ -> version \d+ \(topk16, \d+ bytes", logs)) == 15, logs
    # Every update's body, compressed, as the aggregator counted it: far below float32's 797 kB.
    metrics = _get(p, "/metrics")[1].decode()
    received = float(re.search(r"^fedsim_received_bytes_total (\S+)", metrics, re.M).group(1))
    assert received < 15 * 797_000 / 30, metrics
    # The residuals live in the worker-state volume, one file per logical client trained.
    listed = p.compose("run", "--rm", "--no-deps", "--entrypoint", "ls", "client", "/state")
    files = sorted(listed.stdout.split())
    trained = {c for e in json.loads(_get(p, "/v1/history")[1])["history"] for c in e["clients"]}
    assert files == sorted(f"{c}.safetensors" for c in trained), (files, trained)


def test_compose_run_with_secure_aggregation_and_a_worker_killed_mid_round(project, mnist_dir):
    settings = {
        "PARTITION": "iid",
        "NUM_CLIENTS": "10",
        "CLIENTS_PER_ROUND": "5",
        "AGGREGATION": "fedavg",
        "ROUNDS": "3",
        "EPOCHS": "1",
        "SECAGG": "true",
        "TASK_TIMEOUT": "20",  # the killed worker's task runs out soon, and goes on without it
        "ROUND_DEADLINE": "300",
    }
    p: Project = project(settings)
    p.add_mnist(mnist_dir)
    p.compose("up", "-d", "--build", "--scale", "client=3")

    # Kill one worker once round 2 is training (its masked inputs are coming in).
    deadline = time.monotonic() + RUN_TIMEOUT
    while not re.search(r"round 2: phase shares closed", p.logs("aggregator")):
        assert time.monotonic() < deadline, p.logs()
        time.sleep(0.5)
    victim = f"{p.name}-client-1"
    p.run("docker", "kill", victim)

    clients = p.wait_exited("client", 3)
    finished = [c for c in clients if c["Name"] != victim]
    assert [c["ExitCode"] for c in finished] == [0, 0], p.logs()
    status = p.status()
    assert (status["version"], status["finished"]) == (3, True), status
    rounds = status["secagg"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3], rounds
    assert all(r["masked_in"] >= 4 and r["protocol_bytes"] > 0 for r in rounds), rounds
    metrics = _get(p, "/metrics")[1].decode()
    assert re.search(r"^fedsim_secagg_clients_masked_total \d", metrics, re.M), metrics

    # Only the workers hold the secret: the aggregator has no such file.
    assert p.compose("exec", "-T", "aggregator", "test", "-e",
                     "/run/secrets/fedsim-workers/secagg.key", check=False).returncode != 0  # fmt: skip
    # Per-client rows say only that their rounds were secure: no loss, no accuracy.
    rows = [c for c in status["clients"] if c["updates"]]
    assert rows and all(c["secagg"] == "true" and c["loss"] is None for c in rows), rows
