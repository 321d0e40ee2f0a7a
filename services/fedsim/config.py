"""fedsim's settings, read from the environment and validated once at start.

Values come from the process environment; a `.env` file in the working directory
(or the file named by `FEDSIM_ENV_FILE`) fills in keys the environment does not
set, as Docker Compose does. A bad value raises `ConfigError`, whose message is
one line naming the key, the value and what is allowed. The rows (keys,
defaults, parsers) are in `fedsim.settings_table`; this module resolves them into
`Settings` and refuses combinations that cannot run.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsim import rules
from fedsim.settings import ConfigError, Setting
from fedsim.settings_table import (
    ATTACKS,
    COMPOSE_KEYS,
    DEFAULT_SLICES,
    KNOWN_KEYS,
    MODELS,
    OPTIMIZERS,
    PARTITIONS,
    RULE_KEYS,
    SECRET_KEYS,
    SETTINGS,
    TRAIN_IMAGES,
)

__all__ = [
    "ATTACKS",
    "COMPOSE_KEYS",
    "DEFAULT_SLICES",
    "KNOWN_KEYS",
    "MIN_CLIENT_SAMPLES",
    "MODELS",
    "OPTIMIZERS",
    "PARTITIONS",
    "RETIRED_KEYS",
    "SECRET_KEYS",
    "SETTINGS",
    "TRAIN_IMAGES",
    "ConfigError",
    "Setting",
    "Settings",
    "load",
    "parse_slices",
    "read_env_file",
]

# Keys of earlier versions, with why they are gone; an empty value is ignored.
RETIRED_KEYS = {
    "CLIENT_INDEX": "workers now take their logical client from the aggregator; delete the line",
    "ROUND_TIMEOUT": "renamed ROUND_DEADLINE (seconds, auto or off; docs/population.md): rename the"
    " line",
}

MIN_CLIENT_SAMPLES = 10  # dirichlet: the fewest images any logical client gets

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
    momentum: float
    model: str
    seed: int
    aggregation: str
    overselect: float
    round_deadline: float | str | None  # seconds, "auto", or None (off)
    min_clients: int
    rounds: int
    save_model: int
    durable: bool
    keep_checkpoints: int
    idle_save_seconds: float
    max_update_bytes: int
    client_quota_versions: int
    aggregator_url: str
    data_dir: Path
    model_dir: Path
    worker_state_dir: Path
    data_verify: bool
    mnist_mirrors: tuple[str, ...]
    tf_threads: int
    http_timeout: float
    attack: str
    attackers: int
    attack_scale: float
    dp: str
    dp_clip: float
    dp_noise: float
    dp_delta: float
    dp_clip_at: str
    dp_clip_quantile: float
    dp_clip_lr: float
    dp_clip_count_noise: float
    dp_epsilon_budget: float
    compression: str
    compression_topk: float
    compression_down: str
    secagg: bool
    secagg_threshold: int
    secagg_key_file: Path
    tls: bool
    tls_ca: Path | None
    tokens_file: Path
    client_token: str
    auth_reads: bool
    run_label: str
    client_speed: str
    client_bandwidth: str
    dropout: float
    dropout_mode: str
    availability: str
    clock: str
    time_scale: float
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
        """The fewest updates a round is published with: at ROUND_DEADLINE, MIN_CLIENTS (0: 1);
        without a deadline a round closes only at CLIENTS_PER_ROUND arrivals."""
        if self.round_deadline is None:
            return self.per_round
        return min(self.min_clients, self.per_round) if self.min_clients else 1

    @property
    def delta(self) -> float:
        """DP_DELTA resolved: 0 means 1 / K^1.1 for K logical clients."""
        return self.dp_delta or 1.0 / self.logical_clients**1.1

    @property
    def count_noise(self) -> float:
        """DP_CLIP_COUNT_NOISE resolved: 0 means m / 20 (Andrew et al. 2021)."""
        return self.dp_clip_count_noise or self.per_round / 20

    @property
    def secagg_t(self) -> int:
        """SECAGG_THRESHOLD resolved: 0 means ceil(2/3 of CLIENTS_PER_ROUND)."""
        return self.secagg_threshold or max(1, -(-2 * self.per_round // 3))

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
        if key not in KNOWN_KEYS and key not in COMPOSE_KEYS:
            raise ConfigError(
                key,
                values[key],
                f"unknown key in {path}; known keys: "
                + ", ".join(sorted(KNOWN_KEYS | COMPOSE_KEYS)),
            )
    return values


def without_settings(
    environ: Mapping[str, str] | None = None, extra: frozenset[str] | set[str] = frozenset()
) -> dict[str, str]:
    """`environ` (default: this process's) less every fedsim and Compose setting, the env
    file's name and `extra`: for a child process (a local run, `docker compose`) whose
    settings must come from its own `.env` or defaults, as a shell's would win over them."""
    drop = KNOWN_KEYS | COMPOSE_KEYS | {"FEDSIM_ENV_FILE"} | set(extra)
    return {k: v for k, v in (os.environ if environ is None else environ).items() if k not in drop}


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
    own = {key.lower(): values.pop(key.lower()) for key in sorted(RULE_KEYS)}
    settings = Settings(**values, rules=own, explicit=frozenset(explicit))
    _check_combinations(settings)
    return settings


def _check_combinations(s: Settings) -> None:
    """Settings that are each valid but impossible together; the message says what to change."""
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
    if s.min_clients and s.round_deadline is None:
        raise ConfigError(
            "MIN_CLIENTS",
            str(s.min_clients),
            "the quorum a round needs at its ROUND_DEADLINE: set ROUND_DEADLINE (seconds or auto)"
            " or MIN_CLIENTS=0; to close rounds at their first N arrivals, set"
            " CLIENTS_PER_ROUND=N and OVERSELECT",
        )
    from fedsim.pipeline.dp import check_settings  # DP against the rule and the attack

    check_settings(s)  # first: a rule DP refuses needs no advice on its own settings
    from fedsim.pipeline import compress  # COMPRESSION against what cannot carry it

    compress.check_settings(s)
    from fedsim.pipeline.secagg.settings import check_settings as check_secagg

    check_secagg(s)  # secure aggregation against the rule, DP, attacks, compression
    rules.check(s)  # the rule's own, against the rest (Krum's n > 2f + 2)
    rounds = rules.chosen(s).mode == "rounds"
    if rounds and s.availability != "always" and s.round_deadline is None:
        raise ConfigError(
            "AVAILABILITY",
            s.availability,
            "round rules then need a ROUND_DEADLINE (seconds or auto): a round that finds too"
            " few clients online is tried again at its deadline",
        )
    if s.clock == "virtual" and not rounds and s.partition == "slices":
        raise ConfigError(
            "CLOCK",
            "virtual",
            f"{s.aggregation} under PARTITION=slices trains each range's slices in order, which"
            " has no simulated order: use another PARTITION (iid, ...) or CLOCK=real",
        )
