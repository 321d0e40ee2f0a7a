"""fedsim on Docker Swarm: deploy/swarm/stackfile.py, and scripts/swarm.sh for real.

The stackfile tests work on Compose configs written out by hand, in the shape of
`docker compose config --format json`. The `docker` tests run scripts/swarm.sh
on a single-node swarm, each in its own copy of the project (compose.yaml,
deploy/, the Dockerfiles, the package, scripts) under a temporary folder, with
its own `.env`, stack name `fedsimtest-<random>` and host port, and remove the
stack and its volume afterwards even when they fail. When the engine is not in
a swarm they run `docker swarm init` and leave the swarm at the end; a swarm
that was already there is left alone.

In CI (`CI=true`) the `docker` tests must run, and fail when there is no Docker
engine; elsewhere they skip with the reason when `docker info` fails.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from docker_helpers import (
    ROOT,
    ProjectCopy,
    clean_env,
    docker_info,
    evaluation_report,
    free_port,
    leftovers,
    projects,
    worker_summary,
)

# Small settings: 4 FedAvg rounds of 3 of 6 IID clients (10,000 images, one epoch
# each), 12 updates; the first round alone scores over 90%.
SMALL = {
    "PARTITION": "iid",
    "NUM_CLIENTS": "6",
    "CLIENTS_PER_ROUND": "3",
    "AGGREGATION": "fedavg",
    "ROUNDS": "4",
    "EPOCHS": "1",
}
SWARM_KEYS = frozenset({"STACK", "WORKERS", "REGISTRY", "SWARM_NODE_ID", "SWARM_UP_TIMEOUT"})
RUN_TIMEOUT = 600  # seconds for a run; it takes about a minute


def _load_stackfile():
    spec = importlib.util.spec_from_file_location(
        "stackfile", ROOT / "deploy" / "swarm" / "stackfile.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


stackfile = _load_stackfile()


# --- stackfile.py on hand-written Compose configs -------------------------------------


def compose_config(**swarm: object) -> dict:
    """A config as `docker compose config --format json` prints compose.yaml + stack.yaml."""
    settings = {
        "SEED": "42",
        "MNIST_MIRRORS": "http://a/ http://b/",
        "PRICE": "5$$",
        "TLS_CA": "/certs/ca.pem",
        "TOKENS_FILE": "/run/secrets/fedsim/tokens.json",
    }
    x_swarm = {
        "stack": "fedsim",
        "workers": "",
        "registry": "",
        "jobs": ["prepare"],
        "secrets": ["/run/secrets/fedsim", "/certs"],
        "local": ["ca-key.pem"],
        "private": ["*-key.pem"],
    }
    return {
        "name": "fedsim",
        "x-settings": settings,
        "x-swarm": x_swarm | swarm,
        "networks": {"default": {"name": "fedsim_default", "ipam": {}}},
        "volumes": {"models": {"name": "fedsim_models"}},
        "services": {
            "prepare": {
                "build": {"context": "/p", "dockerfile": "services/client/Dockerfile"},
                "command": ["python", "-m", "fedsim.prepare"],
                "entrypoint": None,
                "environment": settings,
                "image": "fedsim-client:latest",
                "restart": "no",
                "user": "root",
                "volumes": [
                    {
                        "type": "bind",
                        "source": "/p/data",
                        "target": "/data",
                        "bind": {"create_host_path": True},
                    },
                    {"type": "volume", "source": "models", "target": "/models", "volume": {}},
                ],
            },
            "aggregator": {
                "build": {"context": "/p", "dockerfile": "services/aggregator/Dockerfile"},
                "command": None,
                "depends_on": {"prepare": {"condition": "service_completed_successfully"}},
                "deploy": {"replicas": 1, "endpoint_mode": "dnsrr"},
                "environment": settings,
                "expose": ["8080"],
                "image": "fedsim-aggregator:latest",
                "networks": {"default": None},
                "restart": "unless-stopped",
                "stop_grace_period": "30s",
                "volumes": [
                    {"type": "volume", "source": "models", "target": "/models", "volume": {}}
                ],
            },
            "proxy": {
                "environment": {"TLS": "false", "MAX_UPDATE_BYTES": "16777216"},
                "image": "fedsim-proxy:latest",
                "ports": [
                    {
                        "mode": "ingress",
                        "host_ip": "127.0.0.1",
                        "target": 8080,
                        "published": "18080",
                        "protocol": "tcp",
                    }
                ],
                "volumes": [
                    {
                        "type": "bind",
                        "source": "/p/certs",
                        "target": "/certs",
                        "read_only": True,
                        "bind": {"create_host_path": True},
                    }
                ],
            },
            "client": {
                "deploy": {"replicas": 3, "restart_policy": {"condition": "on-failure"}},
                "environment": settings,
                "image": "fedsim-client:latest",
                "init": True,
                "pull_policy": "never",
                "restart": "on-failure:3",
                "volumes": [
                    {
                        "type": "bind",
                        "source": "/p/data",
                        "target": "/data",
                        "read_only": True,
                        "bind": {"create_host_path": True},
                    }
                ],
            },
            "evaluate": {
                "entrypoint": ["fedsim-entrypoint", "python", "-m", "fedsim.evaluate"],
                "command": [],
                "environment": settings,
                "image": "fedsim-client:latest",
                "profiles": ["tools"],
                "user": "root",
                "volumes": [
                    {"type": "volume", "source": "models", "target": "/models", "read_only": True}
                ],
            },
        },
    }


def test_stack_keeps_long_running_services_in_the_form_swarm_reads():
    config = compose_config()
    config["services"]["client"]["volumes"].append(config["services"]["proxy"]["volumes"][0])
    warnings: list[str] = []

    stack = stackfile.stack_file(config, warn=warnings.append)

    assert set(stack["services"]) == {"aggregator", "proxy", "client"}  # no job, no profile
    aggregator, client = stack["services"]["aggregator"], stack["services"]["client"]
    for service in (aggregator, client):
        assert not {"build", "restart", "depends_on", "pull_policy", "expose"} & set(service)
        assert service["environment"]["PRICE"] == "5$$"  # stack deploy interpolates it
    assert "command" not in aggregator  # null in the config
    assert stack["services"]["proxy"]["ports"] == [
        {"target": 8080, "protocol": "tcp", "mode": "host", "published": 18080}
    ]
    assert aggregator["deploy"] == {"replicas": 1, "endpoint_mode": "dnsrr"}
    assert client["volumes"] == [
        {"type": "bind", "source": "/p/data", "target": "/data", "read_only": True}
    ]
    assert client["deploy"]["replicas"] == 3 and client["init"] is True
    assert stack["networks"] == {"default": {"driver": "overlay", "name": "fedsim_overlay"}}
    assert stack["volumes"] == {"models": {}}  # the stack names it <stack>_models
    # ./certs (for TLS=true) has not been made: the proxy mounts nothing there, and
    # one note says so.
    assert "volumes" not in stack["services"]["proxy"]
    assert "secrets" not in stack["services"]["proxy"]
    assert warnings == [
        "proxy: port 18080 is open on every address of its node "
        "(Swarm cannot publish on 127.0.0.1 only)",
        "/p/certs does not exist: nothing mounted at /certs",
    ]


def test_stack_takes_workers_and_registry_and_names_what_it_leaves_out():
    config = compose_config(workers="5", registry="10.0.0.5:5000/")
    config["services"]["client"]["cpus"] = 0.5
    del config["services"]["proxy"]["volumes"]
    warnings: list[str] = []

    stack = stackfile.stack_file(config, warn=warnings.append)

    assert stack["services"]["client"]["deploy"]["replicas"] == 5
    assert stack["services"]["client"]["image"] == "10.0.0.5:5000/fedsim-client:latest"
    assert stack["services"]["aggregator"]["image"] == "10.0.0.5:5000/fedsim-aggregator:latest"
    assert "cpus" not in stack["services"]["client"]
    assert warnings[-1] == "client.cpus is not used by docker stack deploy: left out"
    assert stackfile.get(config, "images").splitlines() == [
        "fedsim-aggregator:latest 10.0.0.5:5000/fedsim-aggregator:latest",
        "fedsim-client:latest 10.0.0.5:5000/fedsim-client:latest",
        "fedsim-proxy:latest 10.0.0.5:5000/fedsim-proxy:latest",
    ]


@pytest.mark.parametrize(
    ("swarm", "message"),
    [
        ({"stack": "Fed Sim"}, "invalid setting STACK='Fed Sim': lowercase letters, digits"),
        ({"stack": "x" * 41}, "at most 40 characters"),
        ({"workers": "0"}, "invalid setting WORKERS='0': an integer >= 1"),
        ({"workers": "two"}, "invalid setting WORKERS='two': an integer >= 1"),
        ({"registry": "http://lab:5000"}, "invalid setting REGISTRY='http://lab:5000'"),
    ],
)
def test_bad_swarm_settings_are_refused_with_the_key(swarm, message):
    with pytest.raises(stackfile.StackError, match=re.escape(message)):
        stackfile.stack_file(compose_config(**swarm))


def test_a_config_without_stack_yaml_or_an_aggregator_is_refused():
    config = compose_config()
    del config["x-swarm"]
    with pytest.raises(stackfile.StackError, match=re.escape("merge deploy/swarm/stack.yaml")):
        stackfile.stack_file(config)
    config = compose_config()
    del config["services"]["aggregator"]
    with pytest.raises(stackfile.StackError, match="no aggregator service"):
        stackfile.stack_file(config)


def _secrets_mount(folder: Path) -> dict:
    return {
        "type": "bind",
        "source": str(folder),
        "target": "/run/secrets/fedsim",
        "read_only": True,
        "bind": {"create_host_path": True},
    }


def test_a_read_only_secrets_folder_becomes_one_swarm_secret_per_file(tmp_path):
    folder = tmp_path / "secrets"
    folder.mkdir()
    (folder / "tokens.json").write_text('{"workers": "ab"}')
    config = compose_config()
    for name in ("aggregator", "client"):
        config["services"][name]["volumes"].append(_secrets_mount(folder))

    stack = stackfile.stack_file(config)

    (key,) = stack["secrets"]
    assert re.fullmatch(r"tokens-json-[0-9a-f]{12}", key), key
    assert stack["secrets"][key] == {"file": str(folder / "tokens.json")}
    for name in ("aggregator", "client"):
        service = stack["services"][name]
        assert service["secrets"] == [
            {"source": key, "target": "/run/secrets/fedsim/tokens.json", "mode": 0o444}
        ]
        assert all(v["target"] != "/run/secrets/fedsim" for v in service["volumes"])
    assert stack["services"]["proxy"].get("secrets") is None  # ./certs is not there yet
    # New content, new secret: Swarm secrets cannot be changed in place.
    (folder / "tokens.json").write_text('{"workers": "cd"}')
    assert set(stackfile.stack_file(config)["secrets"]) != {key}


def test_the_cas_key_stays_here_and_the_proxys_key_is_for_root_only(tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("ca.pem", "ca-key.pem", "server.pem", "server-key.pem"):
        (certs / name).write_text(name)
    config = compose_config()
    config["services"]["proxy"]["volumes"][0]["source"] = str(certs)

    stack = stackfile.stack_file(config)

    mounts = {m["target"]: m["mode"] for m in stack["services"]["proxy"]["secrets"]}
    assert mounts == {
        "/certs/ca.pem": 0o444,
        "/certs/server-key.pem": 0o400,
        "/certs/server.pem": 0o444,
    }
    assert sorted(f["file"] for f in stack["secrets"].values()) == [
        str(certs / n) for n in ("ca.pem", "server-key.pem", "server.pem")
    ]


def test_only_the_listed_read_only_folders_become_secrets(tmp_path):
    folder = tmp_path / "secrets"
    folder.mkdir()
    (folder / "tokens.json").write_text("{}")
    config = compose_config(secrets=["/certs"])
    config["services"]["client"]["volumes"].append(_secrets_mount(folder))
    writable = compose_config()
    writable["services"]["client"]["volumes"].append({**_secrets_mount(folder), "read_only": False})

    for cfg in (config, writable):
        client = stackfile.stack_file(cfg)["services"]["client"]
        assert "secrets" not in client
        assert any(v["target"] == "/run/secrets/fedsim" for v in client["volumes"])


def test_run_args_mount_the_stacks_volume_for_a_job_on_this_node():
    config = compose_config(stack="lab1")

    prepare = stackfile.run_args(config, "prepare")
    evaluate = stackfile.run_args(config, "evaluate")

    assert prepare[:5] == ["--rm", "--label", "com.docker.stack.namespace=lab1", "--user", "root"]
    assert "PRICE=5$" in prepare and "MNIST_MIRRORS=http://a/ http://b/" in prepare
    assert "type=volume,source=lab1_models,target=/models" in prepare
    assert "type=bind,source=/p/data,target=/data" in prepare
    assert prepare[-4:] == ["fedsim-client:latest", "python", "-m", "fedsim.prepare"]
    assert "type=volume,source=lab1_models,target=/models,readonly" in evaluate
    entry = evaluate.index("--entrypoint")
    assert evaluate[entry : entry + 2] == ["--entrypoint", "fedsim-entrypoint"]
    assert evaluate[-4:] == ["fedsim-client:latest", "python", "-m", "fedsim.evaluate"]
    with pytest.raises(stackfile.StackError, match="no prometheus service"):
        stackfile.run_args(config, "prometheus")


def test_run_args_create_a_missing_bind_folder_as_compose_would(tmp_path):
    config = compose_config()
    config["services"]["prepare"]["volumes"].append(
        {**_secrets_mount(tmp_path / "secrets"), "read_only": False}
    )

    args = stackfile.run_args(config, "prepare")

    assert (tmp_path / "secrets").is_dir()
    assert f"type=bind,source={tmp_path / 'secrets'},target=/run/secrets/fedsim" in args


def test_get_port_url_ca_tokens_volume_and_unknown_key():
    config = compose_config(stack="lab1")
    for name in ("client", "proxy"):
        config["services"][name]["volumes"].append(
            {"type": "bind", "source": "/p/certs", "target": "/certs", "read_only": True}
        )
    config["services"]["client"]["volumes"].append(_secrets_mount(Path("/p/secrets")))
    assert stackfile.get(config, "port") == "18080"
    assert stackfile.get(config, "url") == "http://127.0.0.1:18080"
    assert stackfile.get(config, "ca") == ""
    assert stackfile.get(config, "tokens") == "/p/secrets/tokens.json"
    assert stackfile.get(config, "volume") == "lab1_models"
    config["services"]["proxy"]["environment"]["TLS"] = "True"
    assert stackfile.get(config, "url") == "https://127.0.0.1:18080"
    assert stackfile.get(config, "ca") == "/p/certs/ca.pem"
    del config["services"]["proxy"]["ports"]
    with pytest.raises(stackfile.StackError, match="no service publishes the aggregator's API"):
        stackfile.get(config, "url")
    with pytest.raises(stackfile.StackError, match="unknown key 'nodes'"):
        stackfile.get(config, "nodes")


# --- scripts/swarm.sh on a single-node swarm ------------------------------------------


def _docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done.stdout


@pytest.fixture(scope="module")
def swarm() -> Iterator[bool]:
    """A Docker engine that is a swarm manager; True when the swarm was made here
    (and is left at the end)."""
    state, manager = docker_info("{{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}}").split()
    made_here = False
    if state == "inactive":
        _docker("swarm", "init", "--advertise-addr", "127.0.0.1")
        made_here = True
    elif state != "active" or manager != "true":
        pytest.fail(f"this engine is in a swarm but not as a manager (state {state})")
    yield made_here
    if made_here:
        _docker("swarm", "leave", "--force", check=False)


class Stack(ProjectCopy):
    """One project folder with its `.env`, run with scripts/swarm.sh."""

    name_key, name_prefix, extra_keys = "STACK", "fedsimtest-", SWARM_KEYS

    def swarm_sh(
        self, *args: str, check: bool = True, timeout: float = 900
    ) -> subprocess.CompletedProcess[str]:
        """scripts/swarm.sh in the project folder; stdout and stderr together."""
        return self.run("scripts/swarm.sh", *args, check=check, timeout=timeout)

    def status(self) -> dict:
        """GET /v1/status through the proxy (HTTPS, checked with ./certs/ca.pem, with TLS)."""
        if self.settings.get("TLS") == "true":
            context = ssl.create_default_context(cafile=self.folder / "certs" / "ca.pem")
            url = f"https://127.0.0.1:{self.port}/v1/status"
        else:
            context, url = None, f"http://127.0.0.1:{self.port}/v1/status"
        with urllib.request.urlopen(url, timeout=10, context=context) as response:
            return json.load(response)

    def wait_status(self, done, what: str, timeout: float = RUN_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if done(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not reached in {timeout} s: {status}\n{self.logs()}")
            time.sleep(1)

    def tasks(self, service: str) -> list[dict]:
        """Every task of a service, old ones included: Name, CurrentState, Error."""
        out = _docker("service", "ps", "--no-trunc", "--format", "json", f"{self.name}_{service}")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait_workers_done(self, count: int, timeout: float = RUN_TIMEOUT) -> list[dict]:
        """Wait until `count` worker tasks have ended; a failed one is retried first."""
        deadline = time.monotonic() + timeout
        while True:
            tasks = self.tasks("client")
            ended = [t for t in tasks if t["DesiredState"] == "Shutdown"]
            if len(tasks) >= count and len(ended) == len(tasks):
                return tasks
            if time.monotonic() > deadline:
                raise AssertionError(f"workers not done in {timeout} s: {tasks}\n{self.logs()}")
            time.sleep(2)

    def containers(self, service: str) -> list[str]:
        label = f"com.docker.swarm.service.name={self.name}_{service}"
        return _docker("ps", "-aq", "--filter", f"label={label}").split()

    def logs(self) -> str:
        out = []
        for service in ("aggregator", "client"):
            for container in self.containers(service):
                done = subprocess.run(
                    ["docker", "logs", container], capture_output=True, text=True, check=False
                )
                out.append(f"--- {service} {container}\n{done.stdout}{done.stderr}")
        return "\n".join(out)

    def down(self) -> None:
        self.swarm_sh("down", "--volumes", check=False, timeout=300)


@pytest.fixture
def stack(swarm, tmp_path) -> Iterator:
    yield from projects(tmp_path, Stack)


@pytest.mark.docker
def test_swarm_run_scales_evaluates_and_goes_down(stack, mnist_dir):
    s = stack({**SMALL, "WORKERS": "2"})
    s.add_mnist(mnist_dir)

    up = s.swarm_sh("up")
    assert f"stack {s.name} up: aggregator healthy" in up.stdout, up.stdout
    assert "2 workers" in up.stdout, up.stdout

    # A third worker once the first round is in; it finds work, or the run finished.
    s.wait_status(lambda st: st["version"] >= 1, "the first aggregated update")
    _docker("service", "scale", "--detach", f"{s.name}_client=3")
    status = s.wait_status(lambda st: st["finished"], "the end of the run")
    tasks = s.wait_workers_done(3)

    # Every worker ended with exit 0 (Complete), none failed and was retried.
    assert sorted(t["Name"] for t in tasks) == [f"{s.name}_client.{k}" for k in (1, 2, 3)], tasks
    assert all(t["CurrentState"].startswith("Complete") for t in tasks), tasks
    # Every update counted once: 4 rounds of 3 clients, each pushed and aggregated once.
    summaries = [worker_summary(_docker("logs", c)) for c in s.containers("client")]
    status = s.status()
    assert status["updates"] == 12 and status["version"] == 4, status
    assert sum(w["accepted"] for w in summaries) == 12, summaries
    assert all(w["failed"] == 0 for w in summaries), summaries
    ids = [h["update_id"] for h in status["history"] if "update_id" in h]
    assert len(ids) == len(set(ids)), ids
    print(f"workers: {summaries}")

    shown = s.swarm_sh("status").stdout
    assert f"{s.name}_aggregator" in shown and f"{s.name}_client" in shown, shown
    assert "aggregator: version 4, updates 12, finished true" in shown, shown

    evaluation = s.swarm_sh("evaluate", timeout=300)
    accuracy, _ = evaluation_report(evaluation.stdout, s.folder)
    print(f"accuracy after {status['version']} rounds: {accuracy:.4f}")
    assert accuracy >= 0.90, evaluation.stdout

    down = s.swarm_sh("down", "--volumes", timeout=300)
    assert f"stack {s.name} removed, with its volume {s.name}_models" in down.stdout, down.stdout
    gone = {"containers": [], "networks": [], "volumes": []}
    assert leftovers(f"com.docker.stack.namespace={s.name}") == gone
    assert _docker("network", "ls", "-q", "--filter", f"name={s.name}_overlay").strip() == ""
    assert _docker("volume", "ls", "-q", "--filter", f"name={s.name}_models").strip() == ""


@pytest.mark.docker
def test_bad_settings_stop_up_before_anything_is_deployed(stack):
    s = stack({**SMALL, "WORKERS": "zero"})
    result = s.swarm_sh("up", "--no-build", check=False)
    assert result.returncode != 0
    assert result.stdout.strip() == "swarm.sh: invalid setting WORKERS='zero': an integer >= 1", (
        result.stdout
    )

    # A bad fedsim setting stops prepare, with fedsim's own line, before the deploy.
    s = stack({**SMALL, "MAX_RETRY": "zero"})
    result = s.swarm_sh("up", check=False)
    assert result.returncode != 0
    assert "invalid setting MAX_RETRY='zero': an integer >= 1" in result.stdout, result.stdout
    assert "swarm.sh: prepare failed (its message is above); nothing was deployed" in result.stdout
    services = _docker("stack", "services", "-q", s.name, check=False)
    assert services.strip() == "", services


# --- two nodes: a second Docker engine in its own network namespace -------------------

# A TCP forwarder run inside the second node's network namespace: its 127.0.0.1:PORT
# reaches the registry on the first node, as a registry published on every node would.
FORWARDER = """
import asyncio, sys
port, host = int(sys.argv[1]), sys.argv[2]
async def pipe(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    finally:
        w.close()
async def handle(r, w):
    tr, tw = await asyncio.open_connection(host, port)
    await asyncio.gather(pipe(r, tw), pipe(tr, w), return_exceptions=True)
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""


class SecondNode:
    """A second dockerd in network namespace `ns`, joined to this engine's swarm."""

    def __init__(self, ns: str, address: str, socket_path: Path, registry: str) -> None:
        self.ns, self.address, self.registry = ns, address, registry
        self.host = f"unix://{socket_path}"
        self.node_id = ""

    def docker(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        return _docker("-H", self.host, *args, check=check, timeout=timeout)


def _wait(what: str, ready, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not ready in {timeout} s")
        time.sleep(1)


@pytest.fixture
def second_node(swarm, tmp_path) -> Iterator[SecondNode]:
    """A two-node swarm on this machine: this engine (manager, advertised on one end
    of a veth pair) and a second dockerd whose network namespace holds the other end,
    with a registry (deploy/registry) that both reach at 127.0.0.1:PORT.

    Both engines share the file system (./data is at the same path on both nodes)
    but not the network: the workers on the second node reach the aggregator over
    the swarm's overlay network (VXLAN between the two addresses) and pull the
    images from the registry. Everything is undone at the end and this engine's
    swarm is made again on 127.0.0.1.
    """
    if os.environ.get("FEDSIM_TEST_TWO_NODES") != "1":
        # A second Docker engine, a registry and a push of the client image (1.7 GB) take
        # minutes and root: run it on purpose, not in every test run.
        pytest.skip("the two-node swarm runs with FEDSIM_TEST_TWO_NODES=1")
    missing = [tool for tool in ("ip", "nsenter", "dockerd") if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        pytest.skip(f"a second Docker engine needs root and {', '.join(missing) or 'ip'}")
    if not swarm:
        pytest.skip("the engine was already in a swarm: the two-node test makes its own")
    tag = secrets.token_hex(3)
    ns, subnet = f"fedsimtest{tag}", f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
    here, there = f"{subnet}.1", f"{subnet}.2"
    work = Path(f"/var/lib/fedsimtest-{tag}")  # image layers: on disk, not in /tmp
    run = Path(f"/run/fst-{tag}")  # short: unix socket paths are limited to 108 bytes
    port = free_port()
    with contextlib.ExitStack() as undo:

        def sh(*args: str) -> None:
            subprocess.run(args, check=True, capture_output=True, text=True, timeout=60)

        sh("ip", "netns", "add", ns)
        undo.callback(subprocess.run, ["ip", "netns", "del", ns], check=False)
        sh("ip", "link", "add", f"fs{tag}a", "type", "veth", "peer", "name", f"fs{tag}b")
        undo.callback(subprocess.run, ["ip", "link", "del", f"fs{tag}a"], check=False)
        sh("ip", "link", "set", f"fs{tag}b", "netns", ns)
        sh("ip", "addr", "add", f"{here}/24", "dev", f"fs{tag}a")
        sh("ip", "link", "set", f"fs{tag}a", "up")
        inside = ["ip", "netns", "exec", ns]
        sh(*inside, "ip", "addr", "add", f"{there}/24", "dev", f"fs{tag}b")
        sh(*inside, "ip", "link", "set", f"fs{tag}b", "up")
        sh(*inside, "ip", "link", "set", "lo", "up")

        # nsenter --net, not `ip netns exec`, which would hide the cgroup mounts.
        for folder in (work, run):
            folder.mkdir()
            undo.callback(shutil.rmtree, folder, ignore_errors=True)
        log = open(tmp_path / "dockerd-2.log", "w")  # noqa: SIM115
        undo.callback(log.close)
        enter = ["nsenter", f"--net=/run/netns/{ns}"]
        dockerd = subprocess.Popen(
            [
                *enter,
                "dockerd",
                "--data-root",
                str(work),
                "--exec-root",
                str(run),
                "--pidfile",
                str(run / "dockerd.pid"),
                "-H",
                f"unix://{run}/docker.sock",
                "--storage-driver",
                "overlay2",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

        def stop_dockerd() -> None:
            dockerd.terminate()
            try:
                dockerd.wait(60)
            except subprocess.TimeoutExpired:
                dockerd.kill()
                dockerd.wait()

        undo.callback(stop_dockerd)
        node = SecondNode(ns, there, run / "docker.sock", f"127.0.0.1:{port}")
        _wait(
            "the second dockerd",
            lambda: (
                subprocess.run(
                    ["docker", "-H", node.host, "info", "-f", "{{.ServerVersion}}"],
                    capture_output=True,
                    check=False,
                ).returncode
                == 0
            ),
        )

        subprocess.run(
            [
                "docker",
                "build",
                "-q",
                "-t",
                "fedsim-registry:latest",
                str(ROOT / "deploy/registry"),
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )
        registry = f"fedsimtest-{tag}-registry"
        _docker("run", "-d", "--name", registry, "-p", f"{port}:5000", "fedsim-registry:latest")
        undo.callback(_docker, "rm", "-f", "-v", registry, check=False)
        forwarder = subprocess.Popen(
            [*enter, sys.executable, "-c", FORWARDER, str(port), here],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        undo.callback(forwarder.wait, 10)
        undo.callback(forwarder.terminate)

        # This engine's swarm, advertised where the second node reaches it.
        _docker("swarm", "leave", "--force")
        undo.callback(_docker, "swarm", "init", "--advertise-addr", "127.0.0.1", check=False)
        undo.callback(_docker, "swarm", "leave", "--force", check=False)
        _docker("swarm", "init", "--advertise-addr", here)
        token = _docker("swarm", "join-token", "-q", "worker").strip()
        node.docker("swarm", "join", "--token", token, f"{here}:2377")
        node.node_id = node.docker("info", "-f", "{{.Swarm.NodeID}}").strip()
        undo.callback(_docker, "node", "rm", "--force", node.node_id, check=False)
        undo.callback(node.docker, "swarm", "leave", "--force", check=False)
        _wait(
            "the second node",
            lambda: (
                _docker("node", "inspect", "-f", "{{.Status.State}}", node.node_id).strip()
                == "ready"
            ),
        )
        yield node


def _task_nodes(stack_name: str, service: str) -> list[tuple[str, str, str]]:
    """(node id, state, container id) of every task of a service."""
    ids = _docker("service", "ps", "-q", "--no-trunc", f"{stack_name}_{service}").split()
    fmt = "{{.NodeID}} {{.Status.State}} {{.Status.ContainerStatus.ContainerID}}"
    return [tuple(line.split()) for line in _docker("inspect", "-f", fmt, *ids).splitlines()]


@pytest.mark.docker
def test_two_nodes_workers_pull_from_the_registry_and_train_across_nodes(
    second_node, stack, mnist_dir
):
    # With TLS: the certificates reach the second node as Swarm secrets, and its
    # worker checks the proxy's certificate with the CA.
    s = stack({**SMALL, "WORKERS": "2", "REGISTRY": second_node.registry, "TLS": "true"})
    s.add_mnist(mnist_dir)
    subprocess.run(["scripts/make-certs.sh"], cwd=s.folder, check=True, capture_output=True)
    # The second node gets the worker image before the deploy, so that both workers
    # start together and the second one finds work (up pushes it again, unchanged).
    built = subprocess.run(
        ["docker", "compose", "build", "--quiet", "prepare"],
        cwd=s.folder,
        env=clean_env(SWARM_KEYS),
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    remote = f"{second_node.registry}/fedsim-client:latest"
    _docker("tag", "fedsim-client:latest", remote)
    _docker("push", remote, timeout=900)
    second_node.docker("pull", remote, timeout=900)

    up = s.swarm_sh("up")
    assert f"pushing {second_node.registry}/fedsim-client:latest" in up.stdout, up.stdout
    assert f"aggregator healthy at https://127.0.0.1:{s.port}/" in up.stdout, up.stdout
    status = s.wait_status(lambda st: st["finished"], "the end of the run")
    s.wait_workers_done(2)

    # The spread puts one worker on each node; the aggregator stays on this one.
    manager = _docker("info", "-f", "{{.Swarm.NodeID}}").strip()
    assert [n for n, _, _ in _task_nodes(s.name, "aggregator")] == [manager]
    workers = _task_nodes(s.name, "client")
    assert sorted(n for n, _, _ in workers) == sorted([manager, second_node.node_id]), workers
    assert all(state == "complete" for _, state, _ in workers), workers
    logs = {
        node: (second_node.docker if node == second_node.node_id else _docker)("logs", container)
        for node, _, container in workers
    }
    image = second_node.docker("image", "ls", "--format", "{{.Repository}}")
    assert f"{second_node.registry}/fedsim-client" in image.split(), image

    # The second node's worker exited 0 with its summary, so it had the aggregator's
    # answers, over the overlay network and through the proxy with TLS (unreachable,
    # it exits 1); every update of the run was counted once, whichever node trained it.
    summaries = {node: worker_summary(log) for node, log in logs.items()}
    status = s.status()
    assert status["updates"] == 12, status
    assert sum(w["accepted"] for w in summaries.values()) == 12, summaries
    print(
        "updates trained: this node "
        f"{summaries[manager]['trained']}, second node {summaries[second_node.node_id]['trained']}"
    )

    t0 = time.monotonic()
    down = s.swarm_sh("down", "--volumes", check=False, timeout=300)
    print(f"down took {time.monotonic() - t0:.1f}s: {down.stdout}")
    if down.returncode != 0:
        state = {
            "node ls": _docker("node", "ls", check=False),
            "stack ps": _docker("stack", "ps", s.name, check=False),
            "ps here": _docker("ps", "-a", check=False),
            "ps there": second_node.docker("ps", "-a", check=False),
            "networks here": _docker("network", "ls", check=False),
            "networks there": second_node.docker("network", "ls", check=False),
            "network": _docker("network", "inspect", f"{s.name}_overlay", check=False),
        }
        raise AssertionError(down.stdout + "\n".join(f"--- {k}\n{v}" for k, v in state.items()))
    assert f"stack {s.name} removed, with its volume" in down.stdout, down.stdout
