"""`.env.example` and `compose.yaml` stay in step with the settings in fedsim.config.

Every setting must appear in `.env.example` with the code's default, and
compose.yaml must hand every setting to the containers as `${KEY:-default}`
with the same default, so that `docker compose up` without a `.env` behaves
like the code's defaults. Read without Docker: these are fast unit tests.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from dotenv import dotenv_values

from fedsim import config

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = {s.key: s.default for s in config.SETTINGS}
# Fixed by compose.yaml inside the containers instead of read from .env: the
# aggregator's service name on the Compose network and the mount points.
CONTAINER_VALUES = {
    "AGGREGATOR_URL": "http://proxy:8080",
    "TLS_CA": "/certs/ca.pem",
    "DATA_DIR": "/data",
    "MODEL_DIR": "/models",
    "WORKER_STATE_DIR": "/state",
    "TOKENS_FILE": "/run/secrets/fedsim/tokens.json",
    "SECAGG_KEY_FILE": "/run/secrets/fedsim-workers/secagg.key",
}
FEDSIM_SERVICES = ("prepare", "aggregator", "client", "evaluate")
_DEFAULTED = re.compile(r"^\$\{(?P<key>[A-Z_][A-Z0-9_]*):-(?P<default>.*)\}$")


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return {k: v or "" for k, v in dotenv_values(ROOT / ".env.example").items()}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${KEY:-default}` for one whole value: env[KEY] unless unset or empty."""
    match = _DEFAULTED.match(value)
    if not match:
        return value
    return env.get(match["key"]) or match["default"]


def test_env_example_has_every_setting_with_the_code_default(env_example):
    missing = sorted(set(DEFAULTS) - set(env_example))
    assert not missing, f".env.example lacks {missing}"
    differing = {k: (env_example[k], d) for k, d in DEFAULTS.items() if env_example[k] != d}
    assert not differing, f".env.example differs from the code's defaults: {differing}"


def test_env_example_has_no_unknown_keys(env_example):
    unknown = sorted(set(env_example) - config.KNOWN_KEYS - config.COMPOSE_KEYS)
    assert not unknown
    assert env_example["AGGREGATOR_PORT"] == "8080"


def test_env_example_loads_to_the_same_settings_as_no_file(tmp_path):
    from_example = config.load(environ={}, env_file=ROOT / ".env.example")
    from_nothing = config.load(environ={}, env_file=tmp_path / "absent.env")
    assert from_example.to_dict() == from_nothing.to_dict()


def test_compose_passes_every_setting_with_the_code_default(compose):
    environment = compose["x-settings"]
    assert set(environment) == set(DEFAULTS), "x-settings must list exactly the settings"
    for key, default in DEFAULTS.items():
        value = str(environment[key])
        if key in CONTAINER_VALUES:
            assert value == CONTAINER_VALUES[key], key
            continue
        match = _DEFAULTED.match(value)
        assert match, f"{key}: {value!r} is not ${{{key}:-default}}"
        assert match["key"] == key, f"{key} reads {match['key']}"
        assert match["default"] == default, f"{key}: compose default {match['default']!r}"


def test_every_fedsim_service_gets_the_settings(compose):
    for name in FEDSIM_SERVICES:
        assert compose["services"][name]["environment"] == compose["x-settings"], name


def test_compose_without_env_file_gives_valid_default_settings(compose):
    environ = {k: interpolate(str(v), {}) for k, v in compose["x-settings"].items()}
    settings = config.load(environ=environ, env_file=Path("/nonexistent/.env"))
    expected = config.load(environ={}, env_file=Path("/nonexistent/.env")).to_dict()
    expected.update(CONTAINER_VALUES)
    assert settings.to_dict() == expected


def test_compose_takes_values_from_env(compose):
    env = {"CLIENT_SLICES": "1-2 3-4", "MAX_RETRY": "7"}
    environ = {k: interpolate(str(v), env) for k, v in compose["x-settings"].items()}
    settings = config.load(environ=environ, env_file=Path("/nonexistent/.env"))
    assert settings.client_slices == ((1, 2), (3, 4))
    assert settings.max_retry == 7


def test_compose_publishes_the_proxy_not_the_aggregator(compose):
    services = compose["services"]
    # The proxy is the front door, on the host's loopback unless AGGREGATOR_HOST opens it.
    assert services["proxy"]["ports"] == [
        "${AGGREGATOR_HOST:-127.0.0.1}:${AGGREGATOR_PORT:-8080}:8080"
    ]
    assert "ports" not in services["aggregator"] and services["aggregator"]["expose"] == ["8080"]
    assert services["aggregator"]["healthcheck"]["test"][-1].count("/healthz") == 1


def test_compose_clients_scale(compose):
    client = compose["services"]["client"]
    # A fixed name or a published port would stop `--scale client=N` at the second replica.
    assert "container_name" not in client and "ports" not in client
    assert client["volumes"] == [
        "./data:/data:ro",
        "./secrets:/run/secrets/fedsim:ro",
        "worker-secrets:/run/secrets/fedsim-workers:ro",
        "./certs:/certs:ro",
        "worker-state:/state",  # COMPRESSION=topk: the residuals, shared by every worker
    ]
    assert "worker-state" in compose["volumes"]
    # SECAGG's workers' secret: written by prepare, read by the workers, never mounted
    # into the aggregator.
    assert not any("worker-secrets" in v for v in compose["services"]["aggregator"]["volumes"])
    assert client["restart"].startswith("on-failure")
