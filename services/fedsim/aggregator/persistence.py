"""What the aggregator starts from: the newest good checkpoint, the partition plan, the history.

`load` reads MODEL_DIR once at start and says precisely what is wrong when it
cannot start (`StartupError`, one line): no checkpoint, another model, a
partition plan made with other settings. restore.py builds the pipeline, the
rule and the task queue from what it read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedsim import checkpoints, weights
from fedsim.aggregator import history
from fedsim.aggregator.tasks import Client
from fedsim.aggregator.tasks.flights import BASE_TENSORS
from fedsim.aggregator.tasks.roster import Roster
from fedsim.config import Settings
from fedsim.data import partition, population_file
from fedsim.data.population import DEFAULTS, Population, PopulationError, population_settings
from fedsim.models import SHAPES
from fedsim.protocol import Profile

log = logging.getLogger("fedsim.aggregator")


# Metadata a checkpoint keeps as JSON, and the type each must have.
JSON_METADATA = {
    "strategy_state": dict,
    "tasks_state": dict,
    "applied_ids": list,
    "held": list,
    "stages_state": dict,
}


class StartupError(RuntimeError):
    """The aggregator cannot start from what is in MODEL_DIR."""


@dataclass(frozen=True)
class Start:
    checkpoint: checkpoints.Checkpoint
    samples: int
    updates: int
    applied_ids: list[str]
    strategy_state: dict[str, Any] | None  # None: made by another rule, start it fresh
    strategy_tensors: dict[str, Any]  # the rule's tensors ({} when made by another rule)
    held: list[tuple[str, str, int, int, str | None]]  # updates in the rule's saved buffer
    tasks_state: dict[str, Any]
    manifest: dict[str, Any]  # partitions.json without its clients (`clients` holds them)
    clients: Sequence[Client]  # a Roster (tasks/roster.py), or a list in tests
    history: list[dict[str, Any]]
    stages_state: dict[str, Any] = field(default_factory=dict)  # the pipeline's stages' state
    population: Population | None = None  # clients.json; None: everyone equal
    pending: dict[str, Any] = field(default_factory=dict)  # Evaluations.pending() when saved


def reset_hint(settings: Settings) -> str:
    return (
        f"reset with `docker compose down -v` (local runs: delete {settings.model_dir}) "
        "or change it back"
    )


def _int_meta(meta: Mapping[str, str], key: str) -> int:
    try:
        return max(0, int(meta.get(key, "0")))
    except ValueError:
        raise StartupError(f"checkpoint metadata {key}={meta[key]!r} is not an integer") from None


def _json_meta(meta: Mapping[str, str], key: str, default: Any) -> Any:
    try:
        return json.loads(meta[key]) if key in meta else default
    except ValueError:
        log.warning("checkpoint metadata %s is not JSON: starting it fresh", key)
        return default


def load_plan(settings: Settings) -> tuple[dict[str, Any], Roster]:
    """The partition manifest, checked against the settings, without its clients, and its
    logical clients as a compact Roster (tasks/roster.py): the plan's records are dropped
    once read, so 10,000 clients hold under 1 MB."""
    try:
        manifest = partition.read(settings.model_dir)
    except partition.PartitionError as exc:
        raise StartupError(str(exc)) from None
    diffs = partition.differences(manifest, settings)
    if diffs:
        raise StartupError(
            f"{settings.model_dir / partition.FILE} does not match the settings: "
            f"{'; '.join(diffs)}; {reset_hint(settings)}"
        )
    clients = Roster.of(manifest["clients"])
    return {k: v for k, v in manifest.items() if k != "clients"}, clients


def load_population(settings: Settings, clients: Sequence[Client]) -> Population:
    """clients.json, checked against the settings and the plan's clients. Without the file,
    settings that ask for everyone equal, always there (the defaults) need none."""
    ids = [c.id for c in clients]
    path = settings.model_dir / population_file.FILE
    wanted = population_settings(settings)
    if not path.exists() and all(wanted[k] == v for k, v in DEFAULTS.items()):
        return Population.build(settings, ids)
    try:
        found = population_file.read(settings.model_dir)
        population_file.check_clients(found, ids)
    except PopulationError as exc:
        raise StartupError(f"{exc}; {reset_hint(settings)}") from None
    diffs = population_file.differences(found, settings)
    if diffs:
        raise StartupError(
            f"{path} does not match the settings: {'; '.join(diffs)}; {reset_hint(settings)}"
        )
    return found


def profiles(settings: Settings, found: Population | None) -> Mapping[str, Profile]:
    """What each training task tells its worker of its client, made when a task asks for it
    (not one record per client held); {} when all are equal."""
    if found is None or found.uniform:
        return {}
    return _Profiles(settings, found)


class _Profiles(Mapping[str, Profile]):
    """A population's task profiles by client id."""

    def __init__(self, settings: Settings, found: Population) -> None:
        self._settings, self._found = settings, found

    def __getitem__(self, client_id: str) -> Profile:
        try:
            c = self._found.client(client_id)
        except PopulationError:
            raise KeyError(client_id) from None
        s = self._settings
        return Profile(
            speed=c.speed,
            bandwidth=None if c.bandwidth == float("inf") else c.bandwidth,
            dropout=c.dropout,
            dropout_mode=s.dropout_mode,
            clock=s.clock,
            time_scale=s.time_scale,
        )

    def __iter__(self) -> Iterator[str]:
        return (f"client-{n}" for n in range(1, len(self._found) + 1))

    def __len__(self) -> int:
        return len(self._found)


def load(settings: Settings, rule: str) -> Start:
    """Everything the aggregator resumes from. Raises StartupError."""
    model_dir = settings.model_dir
    for path in checkpoints.remove_temporaries(model_dir):
        log.info("removed %s, left by an interrupted write", path.name)
    layout = SHAPES[settings.model]

    def fits(candidate: checkpoints.Checkpoint) -> None:
        """Skip a checkpoint whose tensors do not fit its model, or whose saved progress
        does not read back: starting from no progress would train and count it all again."""
        if candidate.metadata.get("model", settings.model) == settings.model:
            weights.validate(checkpoints.split(candidate.tensors)[0], layout)
        for key, kind in JSON_METADATA.items():
            if key in candidate.metadata:
                try:
                    value = json.loads(candidate.metadata[key])
                except (ValueError, RecursionError):
                    value = None
                if not isinstance(value, kind):
                    raise weights.WeightsError(422, f"metadata {key} is not a JSON {kind.__name__}")

    ckpt = checkpoints.load_newest(model_dir, check=fits)
    if ckpt is None:
        raise StartupError(
            f"no checkpoint in {model_dir}: run `python -m fedsim.prepare` "
            "(or `docker compose up`, which runs the prepare service) first"
        )
    meta = ckpt.metadata
    if meta.get("model", settings.model) != settings.model:
        raise StartupError(
            f"checkpoint {ckpt.path} holds model {meta['model']!r} but MODEL={settings.model};"
            f" set MODEL={meta['model']}, or {reset_hint(settings)}"
        )
    model_tensors, rule_tensors = checkpoints.split(ckpt.tensors)
    try:
        weights.validate(model_tensors, SHAPES[settings.model])
    except weights.WeightsError as exc:
        raise StartupError(
            f"checkpoint {ckpt.path} does not fit MODEL={settings.model}: {exc.reason}"
        ) from None
    manifest, clients = load_plan(settings)
    found = load_population(settings, clients)
    strategy_state = None
    if meta.get("strategy") == rule:
        strategy_state = _json_meta(meta, "strategy_state", {})
    elif "strategy" in meta and ckpt.version > 0:
        log.info(
            "checkpoint was made by %s; %s starts fresh from its weights", meta["strategy"], rule
        )
    tasks_state = _json_meta(meta, "tasks_state", {}) if meta.get("strategy") == rule else {}
    same_rule = meta.get("strategy") == rule
    # Update ids and the queue's progress go together: another rule starts both afresh
    # (the same task ids name its new work).
    applied = _json_meta(meta, "applied_ids", []) if same_rule else []
    held = _json_meta(meta, "held", []) if same_rule else []
    try:
        held = [
            (str(i), str(c), int(n), int(b), None if t is None else str(t))
            for i, c, n, b, t in held
        ]
    except (TypeError, ValueError):
        raise StartupError(f"checkpoint {ckpt.path} has a malformed held list") from None
    # Versions above the checkpoint's were lost with the process that made them; their
    # numbers will be made again from other weights, so their scores no longer apply.
    entries = history.read(model_dir)
    kept = [e for e in entries if e["version"] <= ckpt.version]
    if len(kept) != len(entries):
        history.rewrite(model_dir, kept)
        log.info(
            "history: dropped %d entries of versions lost in a restart", len(entries) - len(kept)
        )
    return Start(
        checkpoint=checkpoints.Checkpoint(ckpt.path, ckpt.version, model_tensors, ckpt.metadata),
        # CLOCK=virtual's flights keep their bases beside the rule's tensors (virtual_async.py)
        strategy_tensors={k: v for k, v in rule_tensors.items() if not k.startswith(BASE_TENSORS)}
        if meta.get("strategy") == rule
        else {},
        held=held,
        samples=_int_meta(meta, "samples"),
        updates=_int_meta(meta, "updates"),
        applied_ids=[str(i) for i in applied],
        strategy_state=strategy_state if isinstance(strategy_state, dict) else {},
        tasks_state=tasks_state if isinstance(tasks_state, dict) else {},
        manifest=manifest,
        clients=clients,
        history=kept,
        stages_state=_json_meta(meta, "stages_state", {}) if same_rule else {},
        population=found,
        pending=_pending(meta, ckpt.path) if same_rule else {},
    )


def _pending(meta: Mapping[str, str], path: object) -> dict[str, Any]:
    """The checkpoint's `Evaluations.pending()`: {} when it has none (made before they were
    kept) or they are malformed (the entries to come then name fewer clients)."""
    found = _json_meta(meta, "pending", {})
    if found == {}:
        return {}

    def names(value: object) -> bool:
        return isinstance(value, list) and all(isinstance(c, str) for c in value)

    def by_version(value: object) -> bool:
        return isinstance(value, dict) and all(
            k.isascii() and k.isdigit() and names(v) for k, v in value.items()
        )

    if (
        isinstance(found, dict)
        and set(found) == {"round", "waiting", "since"}
        and (found["round"] is None or type(found["round"]) is int)
        and by_version(found["waiting"])
        and names(found["since"])
    ):
        return found
    log.warning("checkpoint %s: malformed pending entries; the next ones name fewer clients", path)
    return {}
