"""Every setting of fedsim, read from the environment and validated once at start.

Values come from the process environment; a `.env` file in the working directory
(or the file named by `FEDSIM_ENV_FILE`) fills in keys the environment does not
set, as Docker Compose does. A bad value raises `ConfigError`, whose message is
one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

TRAIN_IMAGES = 60_000  # MNIST's training set; slices are cut from it
MODELS = ("mlp", "cnn")
OPTIMIZERS = ("sgd", "adam")
STRATEGIES = ("async-weighted", "fedavg", "fedasync")

# Keys that Compose reads from the same .env but the Python code does not use.
COMPOSE_KEYS = frozenset({"AGGREGATOR_PORT", "COMPOSE_PROJECT_NAME", "COMPOSE_FILE"})


class ConfigError(ValueError):
    """A setting has a value fedsim cannot use."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"invalid setting {key}={value!r}: {allowed}")


# --- parsers: str -> value, raising ValueError with what is allowed -----------------


def _int(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        allowed = f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(allowed) from None
        if value < lo or (hi is not None and value > hi):
            raise ValueError(allowed)
        return value

    return parse


def _float(lo: float, *, strict: bool) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        allowed = f"a number {'>' if strict else '>='} {lo:g}"
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(allowed) from None
        if value != value or value in (float("inf"),) or value < lo or (strict and value == lo):
            raise ValueError(allowed)
        return value

    return parse


def _fraction(raw: str) -> float:
    allowed = "a number > 0 and <= 1"
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(allowed) from None
    if not 0 < value <= 1:  # also false for nan
        raise ValueError(allowed)
    return value


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ValueError("one of " + ", ".join(options))
        return value

    return parse


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("true or false")


def _url(raw: str) -> str:
    parsed = urlparse(raw.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError("an http:// or https:// URL with a host, e.g. http://127.0.0.1:8080")
    return raw.strip().rstrip("/")


def _urls(raw: str) -> tuple[str, ...]:
    urls = tuple(_url(u) + "/" for u in raw.split())
    if not urls:
        raise ValueError("one or more http(s) URLs separated by spaces")
    return urls


def _optional_index(raw: str) -> int | None:
    if raw.strip() == "":
        return None
    return _int(1)(raw)


def _path(raw: str) -> Path:
    if not raw.strip():
        raise ValueError("a directory path")
    return Path(raw.strip())


_RANGE = re.compile(r"^(\d+)-(\d+)$")


def parse_slices(raw: str, num_slices: int) -> tuple[tuple[int, int], ...]:
    """Parse `CLIENT_SLICES`, e.g. "1-4 5-8 9-12", into inclusive 1-based ranges.

    A single number "7" is the range 7-7. Ranges must lie in 1..num_slices and
    must not overlap.
    """
    ranges: list[tuple[int, int]] = []
    for token in raw.split():
        match = _RANGE.match(token) or re.match(r"^(\d+)$", token)
        if not match:
            raise ValueError(f"'{token}' is not a range like 1-4")
        lo = int(match.group(1))
        hi = int(match.group(match.lastindex or 1))
        if lo > hi:
            raise ValueError(f"range {token} runs backwards")
        if lo < 1 or hi > num_slices:
            raise ValueError(f"range {token} is outside 1-{num_slices} (the number of slices)")
        for other in ranges:
            if lo <= other[1] and other[0] <= hi:
                raise ValueError(f"ranges {other[0]}-{other[1]} and {token} overlap")
        ranges.append((lo, hi))
    if not ranges:
        raise ValueError("one range per client, e.g. '1-4 5-8 9-12'")
    return tuple(ranges)


@dataclass(frozen=True)
class Setting:
    key: str
    default: str
    parse: Callable[[str], Any]
    why: str  # one line: what it is and why this default


# Defaults chosen for the default run (3 clients, mlp, async-weighted); see README.
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "NUM_IMAGES_TRAIN",
        "5000",
        _int(1, TRAIN_IMAGES),
        "images per slice; 5000 cuts MNIST's 60,000 into 12 slices, as the original",
    ),
    Setting(
        "CLIENT_SLICES",
        "1-4 5-8 9-12",
        str,
        "one inclusive slice range per client replica; replica k takes the k-th",
    ),
    Setting(
        "CLIENT_INDEX",
        "",
        _optional_index,
        "which range this client takes (1-based); empty: from the container name",
    ),
    Setting(
        "MAX_RETRY",
        "2",
        _int(1),
        "tries per pull or push before the client goes on without it (original: 2)",
    ),
    Setting(
        "MAX_WAIT",
        "2",
        _float(0, strict=False),
        "upper bound in seconds of the random wait between tries (original: 2)",
    ),
    Setting(
        "EPOCHS",
        "5",
        _int(1),
        "local epochs per slice; 10 or 20 gain at most 0.1 point in the default run at 2-4x the time",
    ),
    Setting(
        "BATCH_SIZE",
        "32",
        _int(1),
        "local minibatch size; 16 and 64 scored lower in the default run",
    ),
    Setting(
        "OPTIMIZER",
        "sgd",
        _choice(*OPTIMIZERS),
        "client optimizer; sgd (momentum 0.9) scored 0.5 point over adam in the default run",
    ),
    Setting(
        "LEARNING_RATE",
        "0.05",
        _float(0, strict=True),
        "the optimizer's step size; 0.05 suits sgd with momentum (use 0.001 with adam)",
    ),
    Setting(
        "MODEL",
        "mlp",
        _choice(*MODELS),
        "mlp: the original 784-200-200-10; cnn: McMahan et al.'s CNN",
    ),
    Setting("SEED", "42", _int(0), "seeds the initial weights and the shuffling, so runs repeat"),
    Setting(
        "AGGREGATION",
        "async-weighted",
        _choice(*STRATEGIES),
        "async-weighted: the original running weighted mean; fedavg: synchronous rounds;"
        " fedasync: staleness-weighted mixing",
    ),
    Setting(
        "FEDASYNC_ALPHA",
        "0.5",
        _fraction,
        "fedasync: mixing rate alpha of a fresh update; 0.5 scored like 0.8 and above 0.3 in the default run",
    ),
    Setting(
        "FEDASYNC_STALENESS",
        "0.5",
        _float(0, strict=False),
        "fedasync: staleness exponent a in alpha * (t - tau + 1) ** -a; 0.5 as in the paper, 0: constant",
    ),
    Setting(
        "MIN_CLIENTS",
        "0",
        _int(0),
        "fedavg: updates that close a round; 0 means one per range of CLIENT_SLICES",
    ),
    Setting(
        "ROUND_TIMEOUT",
        "120",
        _float(0, strict=True),
        "fedavg: seconds after a round's first update that close it with what arrived",
    ),
    Setting("ROUNDS", "10", _int(1), "fedavg: rounds in the run"),
    Setting(
        "SAVE_MODEL", "2", _int(1), "checkpoint every this many accepted updates (original: 2)"
    ),
    Setting("KEEP_CHECKPOINTS", "5", _int(1), "checkpoints kept on disk; older ones are deleted"),
    Setting(
        "IDLE_SAVE_SECONDS",
        "10",
        _float(0, strict=True),
        "checkpoint unsaved updates after this many idle seconds",
    ),
    Setting(
        "MAX_UPDATE_BYTES",
        "16777216",
        _int(1024),
        "largest accepted upload in bytes; 16 MiB fits the cnn (6.7 MB) with room",
    ),
    Setting(
        "AGGREGATOR_URL",
        "http://127.0.0.1:8080",
        _url,
        "where clients find the aggregator (Compose sets http://aggregator:8080)",
    ),
    Setting(
        "DATA_DIR", "data", _path, "folder of the four MNIST files (Compose mounts ./data at /data)"
    ),
    Setting(
        "MODEL_DIR",
        "models",
        _path,
        "folder of the checkpoints (Compose uses the models volume at /models)",
    ),
    Setting(
        "DATA_VERIFY",
        "true",
        _bool,
        "check the MNIST files' SHA-256; false for other IDX data such as Fashion-MNIST",
    ),
    Setting(
        "MNIST_MIRRORS",
        "https://ossci-datasets.s3.amazonaws.com/mnist/ "
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        _urls,
        "where missing MNIST files are downloaded from, tried in order",
    ),
    Setting(
        "TF_THREADS",
        "0",
        _int(0),
        "TensorFlow threads per client; 0: the machine's cores shared among the clients",
    ),
    Setting(
        "HTTP_TIMEOUT", "30", _float(0, strict=True), "seconds a client waits for one HTTP answer"
    ),
)
KNOWN_KEYS = frozenset(s.key for s in SETTINGS)


@dataclass(frozen=True)
class Settings:
    num_images_train: int
    client_slices: tuple[tuple[int, int], ...]
    client_index: int | None
    max_retry: int
    max_wait: float
    epochs: int
    batch_size: int
    optimizer: str
    learning_rate: float
    model: str
    seed: int
    aggregation: str
    fedasync_alpha: float
    fedasync_staleness: float
    min_clients: int
    round_timeout: float
    rounds: int
    save_model: int
    keep_checkpoints: int
    idle_save_seconds: float
    max_update_bytes: int
    aggregator_url: str
    data_dir: Path
    model_dir: Path
    data_verify: bool
    mnist_mirrors: tuple[str, ...]
    tf_threads: int
    http_timeout: float
    # Keys that were set explicitly (not defaulted); the client asks for its
    # range interactively only when CLIENT_SLICES was not given.
    explicit: frozenset[str] = frozenset()

    @property
    def num_slices(self) -> int:
        return TRAIN_IMAGES // self.num_images_train

    @property
    def round_quorum(self) -> int:
        """Updates that close a fedavg round."""
        return self.min_clients or len(self.client_slices)

    def to_dict(self) -> dict[str, Any]:
        """The resolved settings, JSON-friendly, as saved beside results."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            if field.name == "explicit":
                continue
            value = getattr(self, field.name)
            if isinstance(value, Path):
                value = str(value)
            elif field.name == "client_slices":
                value = " ".join(f"{lo}-{hi}" for lo, hi in value)
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name.upper()] = value
        return out


def read_env_file(path: Path) -> dict[str, str]:
    """Read a `.env` file; unknown keys are rejected so a typo cannot pass silently."""
    from dotenv import dotenv_values

    values = {k: (v or "") for k, v in dotenv_values(path).items()}
    for key in values:
        if key not in KNOWN_KEYS and key not in COMPOSE_KEYS:
            raise ConfigError(
                key,
                values[key],
                f"unknown key in {path}; known keys: "
                + ", ".join(sorted(KNOWN_KEYS | COMPOSE_KEYS)),
            )
    return values


def load(environ: Mapping[str, str] | None = None, env_file: Path | None = None) -> Settings:
    """Resolve every setting: environment first, then the `.env` file, then defaults."""
    if environ is None:
        environ = os.environ
    if env_file is None:
        env_file = Path(environ.get("FEDSIM_ENV_FILE", ".env"))
    file_values = read_env_file(env_file) if env_file.is_file() else {}

    values: dict[str, Any] = {}
    explicit = set()
    for setting in SETTINGS:
        if setting.key in environ:
            raw, origin = environ[setting.key], True
        elif setting.key in file_values:
            raw, origin = file_values[setting.key], True
        else:
            raw, origin = setting.default, False
        if origin:
            explicit.add(setting.key)
        try:
            values[setting.key.lower()] = setting.parse(raw)
        except ValueError as exc:
            raise ConfigError(setting.key, raw, str(exc)) from None

    num_slices = TRAIN_IMAGES // values["num_images_train"]
    raw_slices = values["client_slices"]
    try:
        values["client_slices"] = parse_slices(raw_slices, num_slices)
    except ValueError as exc:
        raise ConfigError("CLIENT_SLICES", raw_slices, str(exc)) from None
    index = values["client_index"]
    if index is not None and index > len(values["client_slices"]):
        raise ConfigError(
            "CLIENT_INDEX",
            str(index),
            f"CLIENT_SLICES has only {len(values['client_slices'])} ranges",
        )
    return Settings(**values, explicit=frozenset(explicit))
