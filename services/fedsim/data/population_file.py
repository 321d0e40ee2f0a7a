"""MODEL_DIR/clients.json: the population written by `prepare`, read and checked by the rest.

The file holds the settings that made the population, the availability mode, one line
per logical client and the SHA-256 of the canonical JSON of those two (see
`population._digest`): a file edited by hand, cut short or made with other settings is
refused with one line that names the file and the fault, as partitions.json is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsim.data import listing
from fedsim.data.population import (
    DAY,
    FILE,
    FORMAT,
    POPULATION_KEYS,
    ClientProfile,
    Population,
    PopulationError,
    _digest,
    population_settings,
)

_CLIENT_KEYS = {"id", "speed", "bandwidth", "dropout"}


def write(model_dir: Path, population: Population) -> Path:
    """Write clients.json atomically, one line per client; returns the path."""
    return listing.write(model_dir, FILE, population.to_json())


def read(model_dir: Path) -> Population:
    """MODEL_DIR/clients.json, checked; PopulationError names the file and the fault."""
    content = listing.read(model_dir, FILE, PopulationError)
    try:
        return from_json(content)
    except PopulationError as exc:
        raise PopulationError(f"{model_dir / FILE}: {exc}") from None


def differences(population: Population, settings: Any) -> list[str]:
    """One phrase per population setting in which `settings` differ from the file; [] if none."""
    here, there = population_settings(settings), population.settings
    return [
        f"{key} is {here[key]} here, {there.get(key)} in {FILE}"
        for key in POPULATION_KEYS
        if here[key] != there.get(key)
    ]


def check_clients(population: Population, client_ids: Sequence[str]) -> None:
    """Refuse a population whose clients are not the partition plan's."""
    ids = [f"client-{i}" for i in range(1, len(population) + 1)]  # its clients (checked)
    if ids != list(client_ids):
        raise PopulationError(
            f"{FILE} has {len(ids)} clients, the partition plan {len(client_ids)}: "
            "they were made from different plans"
        )


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def from_json(content: Any) -> Population:
    """The Population of a clients.json content, or PopulationError with the first fault."""
    if not isinstance(content, dict):
        raise PopulationError("not a JSON object")
    if content.get("format") != FORMAT:
        raise PopulationError(f"format is {content.get('format')!r}, expected {FORMAT}")
    settings = content.get("settings")
    if not isinstance(settings, dict) or set(settings) != set(POPULATION_KEYS):
        raise PopulationError(f"settings must have exactly the keys {list(POPULATION_KEYS)}")
    body = {"availability": content.get("availability"), "clients": content.get("clients")}
    try:
        digest = _digest(body)
    except (TypeError, ValueError) as exc:
        raise PopulationError(f"content cannot be hashed ({exc})") from None
    if content.get("sha256") != digest:
        raise PopulationError(
            f"its content does not match its sha256 ({str(content.get('sha256'))[:12]!r} "
            f"recorded, {digest[:12]} computed): the file was changed or damaged"
        )
    how = body["availability"]
    mode = how.get("mode") if isinstance(how, dict) else None
    if mode not in ("always", "diurnal", "trace"):
        raise PopulationError(f"availability mode is {mode!r}, not always, diurnal or trace")
    fraction = 1.0
    if mode == "diurnal":
        fraction = how.get("fraction")
        if not _number(fraction) or not 0 < fraction <= 1 or how.get("day") != DAY:
            raise PopulationError(f"diurnal needs a fraction in (0, 1] and a day of {DAY:g} s")
    clients = body["clients"]
    if not isinstance(clients, list) or not clients:
        raise PopulationError("clients is not a non-empty list")
    extra = {"diurnal": {"phase"}, "trace": {"windows"}}.get(mode, set())
    profiles = [_client(i, c, _CLIENT_KEYS | extra) for i, c in enumerate(clients)]
    return Population.of_profiles(dict(settings), profiles, mode, float(fraction))


def _client(i: int, entry: object, keys: set[str]) -> ClientProfile:
    where = f"clients[{i}]"
    if not isinstance(entry, dict) or set(entry) != keys:
        raise PopulationError(f"{where} must have exactly the keys {sorted(keys)}")
    if entry["id"] != f"client-{i + 1}":
        raise PopulationError(f"{where} id is {entry['id']!r:.40}, expected 'client-{i + 1}'")
    speed, rate, dropout = entry["speed"], entry["bandwidth"], entry["dropout"]
    if not _number(speed) or speed <= 0:
        raise PopulationError(f"{where} speed is {speed!r:.40}, not a number > 0")
    if rate is not None and (not _number(rate) or rate <= 0):
        raise PopulationError(f"{where} bandwidth is {rate!r:.40}, not a number > 0 or null")
    if not _number(dropout) or not 0 <= dropout < 1:
        raise PopulationError(f"{where} dropout is {dropout!r:.40}, not in [0, 1)")
    phase = entry.get("phase")
    if "phase" in keys and (not _number(phase) or not 0 <= phase < DAY):
        raise PopulationError(f"{where} phase is {phase!r:.40}, not in [0, {DAY:g})")
    windows = entry.get("windows")
    if "windows" in keys:
        if not isinstance(windows, list) or not all(
            isinstance(w, list) and len(w) == 2 and all(_number(x) for x in w) and 0 <= w[0] < w[1]
            for w in windows
        ):
            raise PopulationError(f"{where} windows must be [start, end] pairs, 0 <= start < end")
        windows = tuple((float(a), float(b)) for a, b in windows)
    return ClientProfile(
        id=entry["id"],
        speed=float(speed),
        bandwidth=math.inf if rate is None else float(rate),
        dropout=float(dropout),
        phase=None if phase is None else float(phase),
        windows=windows,
    )
