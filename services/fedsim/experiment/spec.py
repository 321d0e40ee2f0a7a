"""An experiment file: read with tomllib, checked whole before anything runs.

    name = "rules-noniid"          # results/<name>/; default: the file's name
    seeds = [1, 2, 3]              # every cell runs once per seed (the SEED setting)
    workers = 2                    # worker processes per run
    engine = "local"               # or "compose", or "keras" (the plain Keras floor:
                                   # FedAvg in one process); --engine on the command line wins
    aim = 1.2                      # with a keras cell: the seconds each cell aims at, as a
                                   # multiple of the plain Keras floor's (reported, not enforced)
    floor_processes = 1            # plain Keras processes sharing a keras cell's clients
    target = 0.9                   # test accuracy: rounds and seconds to reach it; a list
                                   # (e.g. [0.97, 0.95]) reports each, the first is "the" one
    stop = "rounds"                # or "target": stop a run once it reaches the target
    timeout = 3600                 # seconds a run may take (0: no limit)

    [settings]                     # the base: the same keys and values as .env
    PARTITION = "shards"
    ROUNDS = 50

    [grid]                         # one cell per combination of the axes' values
    AGGREGATION = ["fedavg", "median", { value = "fedbuff", EVAL_EVERY = 1 }]
    workers = [1, 2]               # two axes are not settings: workers, and
    engine = ["local", "keras"]    # engine (pairs each cell with the plain Keras floor)

A value written as a table carries settings that go with it (in its cells only).
Every problem is one line naming the file and the key, as `.env`'s are; every
cell's settings pass fedsim.config.load, combinations included.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedsim import config, rules
from fedsim.settings import ConfigError

ENGINES = ("local", "compose", "keras")
STOPS = ("rounds", "target")
TOP_KEYS = (
    "name", "description", "seeds", "workers", "engine", "aim", "target", "stop", "timeout",
    "floor_processes",
)  # fmt: skip
TABLES = ("settings", "grid")
WORKERS_AXIS = "workers"
ENGINE_AXIS = "engine"
FLOOR = "keras"  # the engine of the plain Keras floor
# Settings the runner sets for every run itself.
RESERVED = {
    "SEED": "each run's seed comes from seeds = [...]",
    "RUN_LABEL": "the runner names each run after its cell and seed",
    "MODEL_DIR": "each run gets its own folder",
    "TOKENS_FILE": "each run gets its own",
    "AGGREGATOR_URL": "each run gets its own port",
}
MAX_WORKERS = 64
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ExperimentError(ValueError):
    """The file cannot be run; the message is one line naming the file and the key."""


@dataclass(frozen=True)
class Cell:
    """One combination of the grid's values: what it is called and what it sets."""

    number: int  # 1-based, in the grid's order
    axes: dict[str, str]  # axis -> its value in this cell, with the settings that go with it
    settings: dict[str, str]  # the base, the axes' values and their companions
    workers: int
    engine: str | None = None  # the grid's engine axis; None: the experiment's engine

    @property
    def title(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.axes.items())

    def key(self, engine: str, stop: str, target: float | None) -> str:
        """A folder name: the values, readable, and a digest of what decides the runs."""
        what = {
            "settings": self.settings,
            "workers": self.workers,
            "engine": engine,
            "stop": stop,
            "target": target if stop == "target" else None,
        }
        digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:8]
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", "_".join(self.axes.values())).strip("-")[:48]
        return f"{slug or 'cell'}-{digest}"


@dataclass(frozen=True)
class Experiment:
    path: Path
    name: str
    description: str
    seeds: tuple[int, ...]
    workers: int
    engine: str
    target: float | None
    stop: str
    timeout: float  # 0: none
    aim: float | None  # seconds as a multiple of the floor's, reported beside each ratio
    base: dict[str, str]
    grid: dict[str, list[tuple[str, dict[str, str]]]]  # axis -> [(value, companions)]
    cells: tuple[Cell, ...] = field(default=())
    also: tuple[float, ...] = ()  # further targets, reported beside the first
    floor_processes: int = 1  # a keras cell's processes (floor.py --processes)

    @property
    def targets(self) -> tuple[float, ...]:
        return (() if self.target is None else (self.target,)) + self.also

    @property
    def axes(self) -> list[str]:
        return list(self.grid)

    def with_engine(self, engine: str) -> Experiment:
        if engine not in ENGINES:
            raise ExperimentError(f"--engine: {engine!r} is not one of {', '.join(ENGINES)}")
        try:  # the cells again: under the floor's engine a workers axis is one process
            return _with_cells(replace(self, engine=engine, cells=()))
        except ValueError as exc:
            raise ExperimentError(f"--engine {engine}: {exc}") from None

    def engine_of(self, cell: Cell) -> str:
        return cell.engine or self.engine


def env_value(value: Any) -> str:
    """A TOML value as `.env` would spell it: true/false, 0.001, 50, text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, int | str):
        return str(value)
    raise ValueError(f"a string, number or boolean, not {type(value).__name__}")


def _settings(where: str, table: Any) -> dict[str, str]:
    """A table of settings, each key known and each value parsed by its row."""
    if not isinstance(table, Mapping):
        raise ValueError(f"{where}: a table of settings, e.g. {where} = {{ EPOCHS = 1 }}")
    out: dict[str, str] = {}
    for key, value in table.items():
        out[key] = _setting(where, key, value)
    return out


def _setting(where: str, key: str, value: Any) -> str:
    if key in RESERVED:
        raise ValueError(f"{where}: {key} cannot be set here: {RESERVED[key]}")
    row = next((s for s in config.SETTINGS if s.key == key), None)
    if row is None:
        known = ", ".join(sorted(config.KNOWN_KEYS - set(RESERVED)))
        raise ValueError(f"{where}: unknown key {key!r}; known keys: {known}")
    try:
        raw = env_value(value)
    except ValueError as exc:
        raise ValueError(f"{where}: invalid setting {key}={value!r}: {exc}") from None
    try:
        row.parse(raw)
    except ValueError as exc:
        shown = "(hidden)" if key in config.SECRET_KEYS else raw
        raise ValueError(f"{where}: {ConfigError(key, shown, str(exc))}") from None
    return raw


def _integer(key: str, value: Any, lo: int, hi: int | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or value < lo or (hi is not None and value > hi):
        bound = f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise ValueError(f"{key}: {value!r} is not {bound}")
    return value


def _axis(axis: str, values: Any) -> list[tuple[str, dict[str, str]]]:
    where = f"grid.{axis}"
    if not isinstance(values, list):
        raise ValueError(f"{where}: a list of values, e.g. {axis} = [..., ...]")
    if not values:
        raise ValueError(f"{where}: an empty list: give the values to compare")
    out: list[tuple[str, dict[str, str]]] = []
    for item in values:
        extra: dict[str, str] = {}
        if isinstance(item, Mapping):
            if "value" not in item:
                raise ValueError(f"{where}: a table needs value = ..., e.g. {{ value = 1, ... }}")
            rest = {k: v for k, v in item.items() if k != "value"}
            if axis in rest:
                raise ValueError(f"{where}: {axis} is the axis: give it as value = ...")
            extra = _settings(where, rest)
            item = item["value"]
        if axis == WORKERS_AXIS:
            value = str(_integer(where, item, 1, MAX_WORKERS))
        elif axis == ENGINE_AXIS:
            if extra:
                raise ValueError(f"{where}: an engine takes no settings with it")
            if item not in ENGINES:
                raise ValueError(f"{where}: {item!r} is not one of {', '.join(ENGINES)}")
            value = item
        else:
            value = _setting("grid", axis, item)
        if (value, extra) in out:
            raise ValueError(f"{where}: {shown(value, extra)!r} is listed twice")
        out.append((value, extra))
    return out


def shown(value: str, extra: Mapping[str, str]) -> str:
    """An axis's value as tables show it: `fedavgm (SERVER_LEARNING_RATE=0.1)`."""
    return value + (f" ({' '.join(f'{k}={v}' for k, v in extra.items())})" if extra else "")


def _check(data: dict[str, Any], path: Path) -> Experiment:
    unknown = [k for k in data if k not in TOP_KEYS + TABLES]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}; known keys: {', '.join(TOP_KEYS + TABLES)}")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"name: {name!r} is not 1-64 letters, digits, '.', '-' or '_'")
    description = data.get("description", "")
    if not isinstance(description, str) or "\n" in description:
        raise ValueError("description: one line of text")
    if "seeds" not in data:
        raise ValueError("seeds: missing: give the seeds to run every cell with, e.g. [1, 2, 3]")
    seeds = data["seeds"]
    if not isinstance(seeds, list) or not seeds:
        raise ValueError("seeds: a non-empty list of integers >= 0, e.g. [1, 2, 3]")
    seeds = [_integer("seeds", s, 0) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: {seeds} lists a seed twice")
    workers = _integer("workers", data.get("workers", 2), 1, MAX_WORKERS)
    floor_processes = _integer("floor_processes", data.get("floor_processes", 1), 1, MAX_WORKERS)
    engine = data.get("engine", "local")
    if engine not in ENGINES:
        raise ValueError(f"engine: {engine!r} is not one of {', '.join(ENGINES)}")
    raw = data.get("target")
    if raw == []:
        raise ValueError("target: an empty list: give one accuracy or more, e.g. 0.97")
    targets = raw if isinstance(raw, list) else [] if raw is None else [raw]
    for t in targets:
        ok = isinstance(t, int | float) and not isinstance(t, bool)
        if not ok or not 0 < t <= 1:
            raise ValueError(f"target: {t!r} is not a test accuracy in (0, 1], e.g. 0.97")
    if len(set(targets)) != len(targets):
        raise ValueError(f"target: {targets} lists an accuracy twice")
    target = float(targets[0]) if targets else None
    stop = data.get("stop", "rounds")
    if stop not in STOPS:
        raise ValueError(f"stop: {stop!r} is not one of {', '.join(STOPS)}")
    if stop == "target" and target is None:
        raise ValueError('stop: "target" needs a target, e.g. target = 0.97')
    aim = data.get("aim")
    if aim is not None and (isinstance(aim, bool) or not isinstance(aim, int | float) or aim < 1):
        raise ValueError(f"aim: {aim!r} is not a multiple of the floor's seconds >= 1, e.g. 1.2")
    timeout = data.get("timeout", 0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
        raise ValueError(f"timeout: {timeout!r} is not a number of seconds >= 0 (0: no limit)")
    base = _settings("settings", data.get("settings", {}))
    raw_grid = data.get("grid")
    if raw_grid is None:
        raise ValueError('grid: missing: give at least one axis, e.g. AGGREGATION = ["fedavg"]')
    if not isinstance(raw_grid, Mapping) or not raw_grid:
        raise ValueError('grid: empty: give at least one axis, e.g. AGGREGATION = ["fedavg"]')
    grid = {axis: _axis(axis, values) for axis, values in raw_grid.items()}
    for axis, values in grid.items():
        for _, extra in values:
            clash = [k for k in extra if k in grid]
            if clash:
                raise ValueError(f"grid.{axis}: {clash[0]} is an axis of its own: not in a value")
    experiment = Experiment(
        path, name, description, tuple(seeds), workers, engine, target, stop, float(timeout),
        None if aim is None else float(aim), base, grid,
        also=tuple(float(t) for t in targets[1:]), floor_processes=floor_processes,
    )  # fmt: skip
    return _with_cells(experiment)


def _with_cells(e: Experiment) -> Experiment:
    """Every combination of the axes, each checked by fedsim.config.load with each seed."""
    cells = []
    for combo in itertools.product(*e.grid.values()):
        axes = {axis: shown(*value) for axis, value in zip(e.grid, combo, strict=True)}
        settings = dict(e.base)
        workers, engine = e.workers, None
        for axis, (value, extra) in zip(e.grid, combo, strict=True):
            if axis == WORKERS_AXIS:
                workers = int(value)
            elif axis == ENGINE_AXIS:
                engine = value
            else:
                settings[axis] = value
            settings.update(extra)
        if (engine or e.engine) == FLOOR:
            # floor_processes whatever the workers axis says: the floor runs once per settings.
            workers = e.floor_processes
            if WORKERS_AXIS in axes:
                axes[WORKERS_AXIS] = f"{workers} process{'' if workers == 1 else 'es'}"
            if any(c.settings == settings and e.engine_of(c) == FLOOR for c in cells):
                continue
        cell = Cell(len(cells) + 1, axes, settings, workers, engine)
        same = (settings, workers, engine or e.engine)
        twin = next((c for c in cells if (c.settings, c.workers, e.engine_of(c)) == same), None)
        if twin is not None:
            raise ValueError(f"cells {twin.title} and {cell.title} run the same settings")
        for seed in e.seeds:
            try:
                resolve(cell, seed)
            except ConfigError as exc:
                raise ValueError(f"cell {cell.title} (seed {seed}): {exc}") from None
        if e.engine_of(cell) == FLOOR:
            _check_floor(cell, e.seeds[0])
        cells.append(cell)
    return replace(e, cells=tuple(cells))


def _check_floor(cell: Cell, seed: int) -> None:
    """The plain Keras floor runs FedAvg only: a cell it cannot run is refused here."""
    from fedsim.experiment.floor import unsupported

    refused = unsupported(resolve(cell, seed))
    if refused is not None:
        raise ValueError(f"cell {cell.title}: {refused}")


def resolve(cell: Cell, seed: int, environ: Mapping[str, str] | None = None) -> config.Settings:
    """The settings a run of `cell` with `seed` gets (the code's defaults under the rest)."""
    env = {"FEDSIM_ENV_FILE": os.devnull, **(environ or {}), **cell.settings, "SEED": str(seed)}
    return config.load(environ=env, env_file=Path(os.devnull))


def expected_rounds(settings: config.Settings) -> float:
    """Rounds (or rounds' worth of updates) a run makes when it runs to its end."""
    if rules.rule_class(settings.aggregation).mode == "async" and settings.partition == "slices":
        slices = sum(hi - lo + 1 for lo, hi in settings.client_slices)  # one pass
        return slices / settings.per_round
    return float(settings.rounds)


def load(path: Path) -> Experiment:
    """Read and check `path`; ExperimentError with one line on the first problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ExperimentError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ExperimentError(f"{path}: not TOML: {exc}") from None
    try:
        return _check(data, path)
    except ValueError as exc:
        raise ExperimentError(f"{path}: {' '.join(str(exc).split())}") from None
