"""Every setting of fedsim, read from the environment and validated once at start.

Values come from the process environment; a `.env` file in the working directory
(or the file named by `FEDSIM_ENV_FILE`) fills in keys the environment does not
set, as Docker Compose does. A bad value raises `ConfigError`, whose message is
one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
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
PARTITIONS = ("slices", "iid", "shards", "dirichlet")
ATTACKS = ("none", "label-flip", "scaled", "noise")  # fedsim.client.attacks.KINDS and none
DEFAULT_SLICES = "1-4 5-8 9-12"  # CLIENT_SLICES when empty: three clients of four slices

# Keys of earlier versions, with why they are gone; an empty value is ignored.
RETIRED_KEYS = {
    "CLIENT_INDEX": "workers now take their logical client from the aggregator; delete the line",
}

MIN_CLIENT_SAMPLES = 10  # dirichlet: the fewest images any logical client gets

# Keys that Compose reads from the same .env but the Python code does not use.
COMPOSE_KEYS = frozenset(
    {
        "AGGREGATOR_PORT",
        "AGGREGATOR_HOST",
        "PROMETHEUS_PORT",
        "COMPOSE_PROJECT_NAME",
        "COMPOSE_FILE",
        "REGISTRY_PORT",
        # scripts/swarm.sh's own
        "STACK",
        "WORKERS",
        "REGISTRY",
    }
)


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


def _float_between(lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        allowed = f"a number > {lo:g} and <= {hi:g}"
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(allowed) from None
        if not lo < value <= hi:  # also false for nan
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


def _secret(raw: str) -> str:
    value = raw.strip()
    if value and not re.fullmatch(r"[0-9a-f]{32,128}", value):
        raise ValueError("32-128 lowercase hex digits, as `python -m fedsim.tokens add` prints")
    return value


def _optional_path(raw: str) -> Path | None:
    return Path(raw.strip()) if raw.strip() else None


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
# AGGREGATION and the rules' own rows come from the rules' registry: see `settings_table`.
_COMMON: tuple[Setting, ...] = (
    Setting(
        "NUM_IMAGES_TRAIN",
        "5000",
        _int(1, TRAIN_IMAGES),
        "images per slice; 5000 cuts MNIST's 60,000 into 12 slices, as the original",
    ),
    Setting(
        "CLIENT_SLICES",
        "",
        str,
        f"PARTITION=slices: one inclusive slice range per logical client; empty: {DEFAULT_SLICES}",
    ),
    Setting(
        "PARTITION",
        "slices",
        _choice(*PARTITIONS),
        "how the training images are dealt to logical clients: slices (the original), iid,"
        " shards (McMahan's non-IID), dirichlet",
    ),
    Setting(
        "NUM_CLIENTS",
        "100",
        _int(1, TRAIN_IMAGES),
        "iid, shards, dirichlet: logical clients; 100 as in McMahan et al. 2017",
    ),
    Setting(
        "SHARDS_PER_CLIENT",
        "2",
        _int(1),
        "shards: label-sorted shards per client; 2 as in McMahan et al. 2017",
    ),
    Setting(
        "DIRICHLET_ALPHA",
        "0.5",
        _float(0, strict=True),
        "dirichlet: concentration of each class's split; smaller is more skewed",
    ),
    Setting(
        "CLIENTS_PER_ROUND",
        "0",
        _int(0),
        "logical clients sampled per round (McMahan's C x K); 0: every range under slices,"
        " else a tenth of NUM_CLIENTS",
    ),
    Setting(
        "TASK_TIMEOUT",
        "300",
        _float(0, strict=True),
        "seconds a worker has for a task before it is given to another worker",
    ),
    Setting(
        "EVAL_EVERY",
        "0",
        _int(0),
        "asynchronous rules: score the global model every this many versions; 0: CLIENTS_PER_ROUND",
    ),
    Setting(
        "MAX_RETRY",
        "2",
        _int(1),
        "tries per HTTP request; a push that fails them all is kept and pushed again (original: 2)",
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
        "local epochs per task; 10 or 20 gain at most 0.1 point in the default run at 2-4x the time",
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
        "the workers' optimizer, fresh per task; sgd (momentum 0.9) scored 0.5 point over adam in the default run",
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
        "MIN_CLIENTS",
        "0",
        _int(0),
        "fedavg: updates that close a round early; 0: all the sampled clients",
    ),
    Setting(
        "ROUND_TIMEOUT",
        "600",
        _float(0, strict=True),
        "fedavg: seconds after a round opens that close it with what arrived",
    ),
    Setting(
        "ROUNDS",
        "10",
        _int(1),
        "fedavg: rounds in the run; asynchronous rules off slices: ROUNDS x CLIENTS_PER_ROUND updates",
    ),
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
        "where workers find the aggregator (Compose sets http://aggregator:8080)",
    ),
    Setting(
        "DATA_DIR", "data", _path, "folder of the four MNIST files (Compose mounts ./data at /data)"
    ),
    Setting(
        "MODEL_DIR",
        "models",
        _path,
        "checkpoints, partitions.json and the history (Compose: the models volume at /models)",
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
        "TensorFlow threads per worker; 0: the machine's cores shared among the workers",
    ),
    Setting(
        "HTTP_TIMEOUT", "30", _float(0, strict=True), "seconds a worker waits for one HTTP answer"
    ),
    Setting(
        "ATTACK",
        "none",
        _choice(*ATTACKS),
        "what the ATTACKERS send: label-flip (labels y -> 9 - y), scaled (w_t + ATTACK_SCALE"
        " (w - w_t)), noise (Gaussian of the model's scale)",
    ),
    Setting(
        "ATTACKERS",
        "0",
        _int(0),
        "logical clients that attack, chosen with SEED; the aggregation rule is not told which",
    ),
    Setting(
        "ATTACK_SCALE",
        "10",
        _float_between(0, 1000),
        "scaled: the boost lambda of an attacker's update",
    ),
    Setting(
        "TLS",
        "false",
        _bool,
        "true: the proxy speaks HTTPS with the certificate from scripts/make-certs.sh, and"
        " workers use https:// with AGGREGATOR_URL's host and port",
    ),
    Setting(
        "TLS_CA",
        "certs/ca.pem",
        _optional_path,
        "the CA workers check the proxy's certificate with over https:// (Compose:"
        " /certs/ca.pem); empty: the system's CAs",
    ),
    Setting(
        "TOKENS_FILE",
        "secrets/tokens.json",
        _path,
        "who may change the aggregator's state (prepare creates it; Compose: ./secrets)",
    ),
    Setting(
        "CLIENT_TOKEN",
        "",
        _secret,
        "the token this worker or client sends; empty: the workers' token from TOKENS_FILE",
    ),
    Setting(
        "AUTH_READS",
        "false",
        _bool,
        "also require a token to read the model, status, history and metrics",
    ),
)
SECRET_KEYS = frozenset({"CLIENT_TOKEN"})  # never written to settings.json or reports


@functools.cache
def settings_table() -> tuple[Setting, ...]:
    """Every setting: the common rows, with AGGREGATION and each rule's rows before MIN_CLIENTS.

    Made on first use from the rules' registry (fedsim.aggregator.strategies),
    whose modules import `Setting` and `ConfigError` from here.
    """
    from fedsim.aggregator import strategies

    at = next(i for i, s in enumerate(_COMMON) if s.key == "MIN_CLIENTS")
    return (*_COMMON[:at], strategies.AGGREGATION, *strategies.rule_settings(), *_COMMON[at:])


@functools.cache
def _known_keys() -> frozenset[str]:
    return frozenset(s.key for s in settings_table())


@functools.cache
def _rule_keys() -> frozenset[str]:
    from fedsim.aggregator import strategies

    return frozenset(s.key for s in strategies.rule_settings())


def __getattr__(name: str) -> Any:
    """`SETTINGS` and `KNOWN_KEYS`, made on first use (PEP 562): see `settings_table`."""
    if name == "SETTINGS":
        return settings_table()
    if name == "KNOWN_KEYS":
        return _known_keys()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Settings:
    num_images_train: int
    client_slices: tuple[tuple[int, int], ...]
    partition: str
    num_clients: int
    shards_per_client: int
    dirichlet_alpha: float
    clients_per_round: int
    task_timeout: float
    eval_every: int
    max_retry: int
    max_wait: float
    epochs: int
    batch_size: int
    optimizer: str
    learning_rate: float
    model: str
    seed: int
    aggregation: str
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
    attack: str
    attackers: int
    attack_scale: float
    tls: bool
    tls_ca: Path | None
    tokens_file: Path
    client_token: str
    auth_reads: bool
    # The rules' own settings (FEDPROX_MU, KRUM_F, ...) by lower-case key; read them
    # as attributes, e.g. settings.krum_f.
    rules: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Keys that were set explicitly (not defaulted); the client asks for its
    # range interactively only when CLIENT_SLICES was not given.
    explicit: frozenset[str] = frozenset()

    def __getattr__(self, name: str) -> Any:
        rules = self.__dict__.get("rules") or {}
        if name in rules:
            return rules[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def num_slices(self) -> int:
        return TRAIN_IMAGES // self.num_images_train

    @property
    def logical_clients(self) -> int:
        """How many logical clients the partition makes."""
        return len(self.client_slices) if self.partition == "slices" else self.num_clients

    @property
    def per_round(self) -> int:
        """CLIENTS_PER_ROUND resolved: 0 means every range (slices) or C = 0.1 of the clients."""
        if self.clients_per_round:
            return self.clients_per_round
        if self.partition == "slices":
            return len(self.client_slices)
        return max(1, self.num_clients // 10)

    @property
    def round_quorum(self) -> int:
        """Updates that close a fedavg round: MIN_CLIENTS, else every sampled client."""
        return min(self.min_clients, self.per_round) if self.min_clients else self.per_round

    @property
    def evaluate_every(self) -> int:
        """EVAL_EVERY resolved: 0 means one round's worth of versions."""
        return self.eval_every or self.per_round

    def to_dict(self) -> dict[str, Any]:
        """The resolved settings, JSON-friendly, as saved beside results."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            if field.name in ("explicit", "rules") or field.name.upper() in SECRET_KEYS:
                continue
            value = getattr(self, field.name)
            if isinstance(value, Path):
                value = str(value)
            elif field.name == "client_slices":
                value = " ".join(f"{lo}-{hi}" for lo, hi in value)
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name.upper()] = value
        out.update({key.upper(): value for key, value in self.rules.items()})
        return out


def read_env_file(path: Path) -> dict[str, str]:
    """Read a `.env` file; unknown keys are rejected so a typo cannot pass silently."""
    from dotenv import dotenv_values

    values = {k: (v or "") for k, v in dotenv_values(path).items()}
    for key in values:
        if key in RETIRED_KEYS:
            continue  # checked in load(), with the reason
        if key not in _known_keys() and key not in COMPOSE_KEYS:
            raise ConfigError(
                key,
                values[key],
                f"unknown key in {path}; known keys: "
                + ", ".join(sorted(_known_keys() | COMPOSE_KEYS)),
            )
    return values


def load(environ: Mapping[str, str] | None = None, env_file: Path | None = None) -> Settings:
    """Resolve every setting: environment first, then the `.env` file, then defaults."""
    if environ is None:
        environ = os.environ
    if env_file is None:
        env_file = Path(environ.get("FEDSIM_ENV_FILE", ".env"))
    file_values = read_env_file(env_file) if env_file.is_file() else {}

    for key, why in RETIRED_KEYS.items():
        raw = environ.get(key, file_values.get(key, ""))
        if raw.strip():
            raise ConfigError(key, raw, f"no longer a setting: {why}")

    values: dict[str, Any] = {}
    explicit = set()
    for setting in settings_table():
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
            shown = "(hidden)" if setting.key in SECRET_KEYS else raw
            raise ConfigError(setting.key, shown, str(exc)) from None

    if values["tls"] and values["aggregator_url"].startswith("http://"):
        # TLS=true: the same host and port over HTTPS (Compose fixes http://proxy:8080).
        values["aggregator_url"] = "https://" + values["aggregator_url"].removeprefix("http://")
    num_slices = TRAIN_IMAGES // values["num_images_train"]
    raw_slices = values["client_slices"]
    if raw_slices.strip() and values["partition"] != "slices":
        raise ConfigError(
            "CLIENT_SLICES",
            raw_slices,
            f"only for PARTITION=slices, not {values['partition']}: "
            "empty it (or comment it out) in .env",
        )
    try:
        values["client_slices"] = parse_slices(raw_slices or DEFAULT_SLICES, num_slices)
    except ValueError as exc:
        raise ConfigError("CLIENT_SLICES", raw_slices, str(exc)) from None
    rules = {key.lower(): values.pop(key.lower()) for key in sorted(_rule_keys())}
    settings = Settings(**values, rules=rules, explicit=frozenset(explicit))
    _check_combinations(settings)
    return settings


def _check_combinations(s: Settings) -> None:
    """Settings that are each valid but impossible together; the message says what to change."""
    from fedsim.aggregator import strategies

    if s.partition == "shards":
        shards = s.num_clients * s.shards_per_client
        if shards > TRAIN_IMAGES or TRAIN_IMAGES % shards:
            raise ConfigError(
                "SHARDS_PER_CLIENT",
                str(s.shards_per_client),
                f"NUM_CLIENTS x SHARDS_PER_CLIENT = {shards} shards must divide the "
                f"{TRAIN_IMAGES} training images (e.g. 100 x 2 = 200 shards of 300)",
            )
    if s.partition == "dirichlet" and s.num_clients * MIN_CLIENT_SAMPLES > TRAIN_IMAGES:
        raise ConfigError(
            "NUM_CLIENTS",
            str(s.num_clients),
            f"dirichlet gives every client at least {MIN_CLIENT_SAMPLES} images: "
            f"at most {TRAIN_IMAGES // MIN_CLIENT_SAMPLES} clients",
        )
    if (s.attack == "none") != (s.attackers == 0):
        key, value = ("ATTACKERS", str(s.attackers)) if s.attackers else ("ATTACK", s.attack)
        raise ConfigError(
            key,
            value,
            "ATTACK and ATTACKERS go together: set both (e.g. ATTACK=scaled ATTACKERS=2) or neither",
        )
    if s.attackers > s.logical_clients:
        raise ConfigError(
            "ATTACKERS", str(s.attackers), f"more than the {s.logical_clients} logical clients"
        )
    if s.clients_per_round > s.logical_clients:
        where = "ranges in CLIENT_SLICES" if s.partition == "slices" else "NUM_CLIENTS"
        raise ConfigError(
            "CLIENTS_PER_ROUND",
            str(s.clients_per_round),
            f"more than the {s.logical_clients} logical clients ({where})",
        )
    strategies.build(s)  # each rule checks its settings against the rest (Krum's n > 2f + 2)
