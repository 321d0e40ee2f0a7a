#!/usr/bin/env python3
"""Turn `docker compose config --format json` into what a Docker Swarm stack needs.

    stackfile.py CONFIG stack        the stack file for `docker stack deploy` (JSON)
    stackfile.py CONFIG run SERVICE  `docker run` arguments of a one-shot service,
                                     NUL-separated (prepare, evaluate)
    stackfile.py CONFIG get KEY      stack, registry, port, url, ca, tokens, volume, images

CONFIG is the JSON of `docker compose -f compose.yaml -f deploy/swarm/stack.yaml
--profile tools config --format json` ("-" reads it from stdin). Compose has
already resolved `.env`, the defaults and the anchors, so nothing here repeats a
setting, an image or a volume of compose.yaml; see stack.yaml for why the stack
file is generated. Python's standard library only: the host needs python3, not
PyYAML (JSON is YAML, so `docker stack deploy` reads the output as it is).

What changes on the way to Swarm:
- dropped: the one-shot services named in `x-swarm.jobs` and every service
  under a profile; keys Swarm does not read (`build`, `pull_policy`, `restart`,
  `depends_on`, `expose`: deploy.restart_policy replaces `restart`, the workers
  wait for the aggregator themselves, and every port is open on the overlay
  network). Any other key outside SERVICE_KEYS is dropped
  with a note on stderr, so nothing is lost silently;
- secrets: a read-only bind mount at one of the paths in `x-swarm.secrets`
  (compose.yaml's ./secrets, written by prepare, and ./certs) becomes one Swarm
  secret per file, mounted at the same path, so workers on other nodes need no
  copy of the folder; files matching `x-swarm.local` (the CA's private key) are
  left on this node, those matching `x-swarm.private` (the proxy's key) are
  readable by root only; a folder that does not exist is left out with a note. A
  secret's name ends with a hash of its content: Swarm secrets cannot change,
  so new content makes a new secret and the services are updated to it;
- ports: published in `host` mode on the aggregator's node, without `host_ip`
  (Swarm publishes on every address of the node);
- names: volumes and services get the stack's prefix from `docker stack
  deploy`, so compose.yaml's `name:` fields are dropped; the default network
  becomes the overlay network <stack>_overlay, since a Compose project of the
  same name (say, one running the `registry` profile) owns <stack>_default;
- images: `REGISTRY/<image>` when `x-swarm.registry` is set;
- workers: `x-swarm.workers`, when set, is the client service's replicas.

Errors are one line on stderr (`swarm.sh: ...`, as scripts/swarm.sh shows them)
with exit status 2.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

# Service keys `docker stack deploy` reads and fedsim may use; others are dropped.
SERVICE_KEYS = frozenset(
    {
        "cap_add",
        "cap_drop",
        "command",
        "configs",
        "deploy",
        "dns",
        "entrypoint",
        "environment",
        "extra_hosts",
        "healthcheck",
        "hostname",
        "image",
        "init",
        "labels",
        "logging",
        "networks",
        "ports",
        "read_only",
        "secrets",
        "stop_grace_period",
        "stop_signal",
        "sysctls",
        "tmpfs",
        "ulimits",
        "user",
        "volumes",
        "working_dir",
    }
)
# Compose-only keys that the stack replaces on purpose: dropped without a note.
REPLACED_KEYS = frozenset({"build", "pull_policy", "restart", "depends_on", "expose"})
STACK_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
REGISTRY = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]+)?(/[a-z0-9._/-]+)?$")
KEYS = ("stack", "registry", "port", "url", "ca", "tokens", "volume", "images")
# Inside the containers a secret belongs to root. Readable by all (the image's
# non-root user reads the tokens and the CA certificate, as it reads the bind
# mount under Compose), except private keys (x-swarm.private): root only, which
# the proxy's nginx master is, and a worker is not.
PUBLIC_MODE, PRIVATE_MODE = 0o444, 0o400


class StackError(Exception):
    """A setting or a config that cannot make a stack; the message is one line."""


def swarm_settings(config: dict[str, Any]) -> dict[str, Any]:
    """`x-swarm` from stack.yaml, checked: stack, workers (int or None), registry, jobs,
    secrets."""
    raw = config.get("x-swarm")
    if not isinstance(raw, dict):
        raise StackError(
            "no x-swarm in the config: merge deploy/swarm/stack.yaml over compose.yaml"
        )
    stack = str(raw.get("stack") or "")
    if not STACK_NAME.match(stack):
        raise StackError(
            f"invalid setting STACK={stack!r}: lowercase letters, digits, '-' and '_', "
            "starting with a letter or digit, at most 40 characters"
        )
    workers_raw = str(raw.get("workers") or "").strip()
    workers = None
    if workers_raw:
        if not workers_raw.isdigit() or int(workers_raw) < 1:
            raise StackError(f"invalid setting WORKERS={workers_raw!r}: an integer >= 1")
        workers = int(workers_raw)
    registry = str(raw.get("registry") or "").strip().rstrip("/")
    if registry and not REGISTRY.match(registry):
        raise StackError(
            f"invalid setting REGISTRY={registry!r}: host[:port][/path], e.g. 10.0.0.5:5000"
        )
    return {
        "stack": stack,
        "workers": workers,
        "registry": registry,
        "jobs": list(raw.get("jobs") or []),
        "secrets": [str(p).rstrip("/") for p in raw.get("secrets") or []],
        "private": [str(p) for p in raw.get("private") or []],
        "local": [str(p) for p in raw.get("local") or []],
    }


def image_name(image: str, registry: str) -> str:
    """The image as the nodes pull it: unchanged without a registry."""
    return f"{registry}/{image}" if registry else image


def _deployed(config: dict[str, Any], jobs: list[str]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in config.get("services", {}).items()
        if name not in jobs and not service.get("profiles")
    }


def _port(port: dict[str, Any]) -> dict[str, Any]:
    """Compose's long port syntax as Swarm takes it: no host_ip, host mode, integers."""
    out = {"target": int(port["target"]), "protocol": port.get("protocol", "tcp"), "mode": "host"}
    if port.get("published") not in (None, ""):
        out["published"] = int(port["published"])
    return out


def _volume(volume: dict[str, Any]) -> dict[str, Any]:
    """Compose's long volume syntax without create_host_path, which Swarm does not know."""
    out = {k: v for k, v in volume.items() if k != "bind"}
    bind = {k: v for k, v in (volume.get("bind") or {}).items() if k != "create_host_path"}
    if bind:
        out["bind"] = bind
    return out


def _is_secret_mount(volume: dict[str, Any], paths: list[str]) -> bool:
    return (
        volume.get("type") == "bind"
        and bool(volume.get("read_only"))
        and str(volume.get("target", "")).rstrip("/") in paths
    )


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _secret_files(
    volume: dict[str, Any], swarm: dict[str, Any], secrets: dict[str, Any], warn
) -> list[dict[str, Any]]:
    """One Swarm secret per file of a folder, but those in x-swarm.local; adds them to
    `secrets` (the top level) and returns the service's mounts."""
    folder = Path(volume["source"])
    if not folder.is_dir():
        warn(f"{folder} does not exist: nothing mounted at {volume['target']}")
        return []
    mounts = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if _matches(path.name, swarm["local"]):
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        key = re.sub(r"[^A-Za-z0-9_-]", "-", path.name) + "-" + digest
        secrets[key] = {"file": str(path)}
        mode = PRIVATE_MODE if _matches(path.name, swarm["private"]) else PUBLIC_MODE
        target = f"{str(volume['target']).rstrip('/')}/{path.name}"
        mounts.append({"source": key, "target": target, "mode": mode})
    return mounts


def stack_file(config: dict[str, Any], warn=lambda line: None) -> dict[str, Any]:
    """The stack file: compose.yaml's long-running services, as Swarm reads them."""
    swarm = swarm_settings(config)
    services: dict[str, Any] = {}
    secrets: dict[str, Any] = {}
    said: set[str] = set()

    def warn_once(line: str) -> None:  # several services mount the same folder
        if line not in said:
            said.add(line)
            warn(line)

    for name, service in _deployed(config, swarm["jobs"]).items():
        out: dict[str, Any] = {}
        for key, value in service.items():
            if value is None or key in REPLACED_KEYS:
                continue
            if key not in SERVICE_KEYS:
                warn(f"{name}.{key} is not used by docker stack deploy: left out")
                continue
            out[key] = value
        if "image" not in out:
            raise StackError(f"service {name} has no image: name one in compose.yaml")
        out["image"] = image_name(out["image"], swarm["registry"])
        for port in out.get("ports", []):
            if str(port.get("host_ip", "")).startswith("127."):
                warn(
                    f"{name}: port {port.get('published')} is open on every address of its node "
                    f"(Swarm cannot publish on {port['host_ip']} only)"
                )
        out["ports"] = [_port(p) for p in out.get("ports", [])] or None
        volumes = out.get("volumes", [])
        as_secrets = [v for v in volumes if _is_secret_mount(v, swarm["secrets"])]
        for volume in as_secrets:
            out["secrets"] = out.get("secrets", []) + _secret_files(
                volume, swarm, secrets, warn_once
            )
        out["secrets"] = out.get("secrets") or None
        out["volumes"] = [_volume(v) for v in volumes if v not in as_secrets] or None
        if name == "client" and swarm["workers"] is not None:
            out.setdefault("deploy", {})["replicas"] = swarm["workers"]
        services[name] = {k: v for k, v in out.items() if v is not None}
    if "aggregator" not in services:
        raise StackError("no aggregator service in the config")
    networks = {
        name: {k: v for k, v in (net or {}).items() if k not in ("name", "ipam")}
        | {
            "driver": "overlay",
            "name": f"{swarm['stack']}_{'overlay' if name == 'default' else name}",
        }
        for name, net in config.get("networks", {}).items()
    }
    volumes = {
        name: {k: v for k, v in (vol or {}).items() if k != "name"}
        for name, vol in config.get("volumes", {}).items()
    }
    stack = {"services": services, "networks": networks, "volumes": volumes}
    if secrets:
        stack["secrets"] = secrets
    return stack


def _unescape(value: str) -> str:
    """Compose's config output writes a literal $ as $$ (for a later interpolation)."""
    return value.replace("$$", "$")


def run_args(config: dict[str, Any], name: str) -> list[str]:
    """`docker run` arguments (after `run`) for one-shot service `name` on this node.

    Named volumes become the stack's (<stack>_<volume>), so `prepare` fills the
    volume the aggregator mounts; bind mounts keep their absolute host paths, and
    a missing bind folder that Compose would create is created here, owned by
    the caller (not by root, as the engine would make it).
    """
    swarm = swarm_settings(config)
    service = config.get("services", {}).get(name)
    if service is None:
        raise StackError(f"no {name} service in the config (is --profile tools given?)")
    stack = swarm["stack"]
    args = ["--rm", "--label", f"com.docker.stack.namespace={stack}"]
    if service.get("user"):
        args += ["--user", str(service["user"])]
    if service.get("init"):
        args.append("--init")
    for key, value in sorted((service.get("environment") or {}).items()):
        args += ["--env", f"{key}={_unescape('' if value is None else str(value))}"]
    for volume in service.get("volumes") or []:
        source = volume.get("source", "")
        if volume.get("type") == "volume":
            source = f"{stack}_{source}"
        elif volume.get("type") == "bind" and (volume.get("bind") or {}).get("create_host_path"):
            os.makedirs(source, exist_ok=True)
        mount = f"type={volume['type']},source={source},target={volume['target']}"
        args += ["--mount", mount + (",readonly" if volume.get("read_only") else "")]
    entrypoint = service.get("entrypoint") or []
    if isinstance(entrypoint, str):
        entrypoint = [entrypoint]
    if entrypoint:
        args += ["--entrypoint", entrypoint[0]]
    if "image" not in service:
        raise StackError(f"service {name} has no image")
    args.append(image_name(service["image"], swarm["registry"]))
    args += [_unescape(a) for a in entrypoint[1:]]
    command = service.get("command") or []
    args += [_unescape(a) for a in ([command] if isinstance(command, str) else command)]
    return args


def get(config: dict[str, Any], key: str) -> str:
    """One value for the shell script."""
    swarm = swarm_settings(config)
    if key == "stack":
        return swarm["stack"]
    if key == "registry":
        return swarm["registry"]
    if key == "volume":
        return f"{swarm['stack']}_models"
    if key in ("port", "url", "ca"):
        name, port = _front(config, swarm["jobs"])
        environment = config["services"][name].get("environment") or {}
        tls = str(environment.get("TLS", "false")).strip().lower() in ("1", "true", "yes", "on")
        if key == "port":
            return port
        if key == "url":
            return f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        ca = (_client(config).get("environment") or {}).get("TLS_CA", "")
        return _host_path(config, ca) if tls else ""
    if key == "tokens":  # where prepare writes TOKENS_FILE on this host
        return _host_path(config, (_client(config).get("environment") or {}).get("TOKENS_FILE", ""))
    if key == "images":  # the images to push: local name, then the name the nodes pull
        names = sorted({s["image"] for s in config.get("services", {}).values() if s.get("image")})
        return "\n".join(f"{n} {image_name(n, swarm['registry'])}" for n in names)
    raise StackError(f"unknown key {key!r}: one of {', '.join(KEYS)}")


def _client(config: dict[str, Any]) -> dict[str, Any]:
    """The client service: its environment holds every fedsim setting."""
    return config.get("services", {}).get("client", {})


def _front(config: dict[str, Any], jobs: list[str]) -> tuple[str, str]:
    """The deployed service that publishes the API (container port 8080), and its port."""
    for name, service in _deployed(config, jobs).items():
        for port in service.get("ports") or []:
            if int(port.get("target", 0)) == 8080 and str(port.get("published", "")).isdigit():
                return name, str(port["published"])
    raise StackError("no service publishes the aggregator's API (port 8080): set AGGREGATOR_PORT")


def _host_path(config: dict[str, Any], path: str) -> str:
    """A container path of the client service as a path on this host, through its binds."""
    for volume in _client(config).get("volumes") or []:
        target = str(volume.get("target", "")).rstrip("/")
        if volume.get("type") == "bind" and path.startswith(target + "/"):
            return str(volume["source"]) + path[len(target) :]
    return ""


def main(argv: list[str]) -> int:
    usage = "usage: stackfile.py CONFIG.json (stack | run SERVICE | get KEY)"
    if len(argv) < 2 or argv[1] not in ("stack", "run", "get"):
        print(usage, file=sys.stderr)
        return 2
    try:
        if argv[0] == "-":
            config = json.load(sys.stdin)
        else:
            with open(argv[0], encoding="utf-8") as f:
                config = json.load(f)
    except (OSError, ValueError) as exc:
        print(f"stackfile.py: cannot read the Compose config {argv[0]}: {exc}", file=sys.stderr)
        return 2
    try:
        if argv[1] == "stack":
            stack = stack_file(
                config, warn=lambda line: print(f"swarm.sh: {line}", file=sys.stderr)
            )
            json.dump(stack, sys.stdout, indent=2)
            print()
        elif argv[1] == "run" and len(argv) == 3:
            sys.stdout.write("".join(a + "\0" for a in run_args(config, argv[2])))
        elif argv[1] == "get" and len(argv) == 3:
            print(get(config, argv[2]))
        else:
            print(usage, file=sys.stderr)
            return 2
    except StackError as exc:
        print(f"swarm.sh: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
