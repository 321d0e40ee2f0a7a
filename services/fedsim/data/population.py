"""Who the logical clients are besides their data: how fast, how flaky, when online.

Every draw comes from `numpy.random.default_rng([SEED, attribute])`, so the same
settings (`POPULATION_KEYS`) and client ids always give the same population, and
adding an attribute never changes the others. Per logical client:

- `speed` (`CLIENT_SPEED`): a multiplier of the compute time; 1 is the worker's own
  speed, 10 ten times slower.
- `bandwidth` (`CLIENT_BANDWIDTH`): bytes per second for pulls and pushes; inf: free.
- `dropout` (`DROPOUT`): the probability p that a task fails part-way.
- availability (`AVAILABILITY`): `always`; `diurnal[:F]`, online for the fraction F
  (default 0.5) of a simulated day of 86,400 s from a seeded phase phi in [0, day):
  online(t) iff (t - phi) mod day < F x day; `trace:FILE`, a CSV of online windows
  `client,start,end` in simulated seconds (start <= t < end).

Speed and bandwidth are a `Spread` (spread.py, the settings' forms): a number,
`lognormal:MU,SIGMA` (exp of a normal: mean exp(MU + SIGMA^2/2)), `uniform:LO,HI`, or
`slow:FRACTION,FACTOR[,BASE]`: FRACTION x K seeded clients (rounded, halves up) are
FACTOR times slower than BASE (speed: BASE defaults to 1, slower is x FACTOR;
bandwidth: BASE in bytes/s is needed, slower is / FACTOR).

A task of client c on n samples for E epochs, pulling d and pushing u bytes, takes
    duration = n x E x base_seconds_per_sample x speed_c + (d + u) / bandwidth_c
simulated seconds. Whether it fails is drawn from the task's seed (and attempt),
so a repeated task fails or not alike. `prepare` writes the population beside the
partition plan as MODEL_DIR/clients.json, with the settings that made it and the
SHA-256 of its content; the aggregator refuses one that differs or was altered.
This module is pure: numpy, no TensorFlow, no fedsim setting machinery at import.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.data.mnist import DataError
from fedsim.data.spread import (  # the settings' forms, also importable from here
    SPREAD_FORMS,
    Spread,
    availability_setting,
    bandwidth_setting,
    parse_spread,
    speed_setting,
)

__all__ = [
    "DAY",
    "FILE",
    "POPULATION_KEYS",
    "SPREAD_FORMS",
    "ClientProfile",
    "Population",
    "PopulationError",
    "Spread",
    "availability_setting",
    "bandwidth_setting",
    "drop_draw",
    "parse_spread",
    "population_settings",
    "read_trace",
    "speed_setting",
]

FILE = "clients.json"
FORMAT = 1
DAY = 86_400.0  # a simulated day, in seconds
DIURNAL_FRACTION = 0.5  # diurnal without :F: online half of each simulated day
POPULATION_KEYS = ("SEED", "CLIENT_SPEED", "CLIENT_BANDWIDTH", "DROPOUT", "AVAILABILITY")
DEFAULTS = {
    "CLIENT_SPEED": "1",
    "CLIENT_BANDWIDTH": "inf",
    "DROPOUT": 0.0,
    "AVAILABILITY": "always",
}
# The second word of each draw's seed, so that each attribute has its own stream.
_SPEED, _BANDWIDTH, _PHASE, _DROP = 1, 2, 3, 4


class PopulationError(DataError, ValueError):
    """A population, its settings or its file that cannot be used; one line says why."""


# --- trace files -------------------------------------------------------------------------

_CLIENT = re.compile(r"^(?:client-)?([1-9][0-9]*)$")


def read_trace(path: Path, client_ids: Sequence[str]) -> dict[str, list[tuple[float, float]]]:
    """The online windows of a CSV `client,start,end` (a header line of those words, blank
    lines and lines from # allowed): per client id, sorted. PopulationError names the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PopulationError(f"AVAILABILITY trace {path}: cannot be read ({exc})") from None
    known = set(client_ids)
    windows: dict[str, list[tuple[float, float, int]]] = {}
    for line_no, row in enumerate(csv.reader(io.StringIO(text)), 1):
        where = f"{path} line {line_no}"
        cells = [c.strip() for c in row]
        if not cells or not any(cells) or cells[0].startswith("#"):
            continue
        if line_no == 1 and [c.lower() for c in cells] == ["client", "start", "end"]:
            continue
        if len(cells) != 3:
            raise PopulationError(f"{where}: {len(cells)} fields, expected client,start,end")
        match = _CLIENT.match(cells[0])
        client = f"client-{match.group(1)}" if match else cells[0]
        if client not in known:
            raise PopulationError(
                f"{where}: {cells[0]!r:.40} is not one of the {len(known)} logical clients "
                f"(client-1 ... or 1 ...)"
            )
        try:
            start, end = float(cells[1]), float(cells[2])
        except ValueError:
            raise PopulationError(f"{where}: start and end must be numbers of seconds") from None
        if not (math.isfinite(start) and math.isfinite(end) and 0 <= start < end):
            raise PopulationError(f"{where}: needs 0 <= start < end, finite, got {start}, {end}")
        for lo, hi, other in windows.setdefault(client, []):
            if start < hi and lo < end:
                raise PopulationError(f"{where}: {client}'s window overlaps line {other}'s")
        windows[client].append((start, end, line_no))
    if not windows:
        raise PopulationError(f"AVAILABILITY trace {path}: no windows")
    return {c: sorted((s, e) for s, e, _ in w) for c, w in windows.items()}


# --- the population ----------------------------------------------------------------------


@dataclass(frozen=True)
class ClientProfile:
    """One logical client's speed, bandwidth, dropout and availability."""

    id: str
    speed: float = 1.0  # compute time multiplier
    bandwidth: float = math.inf  # bytes per second
    dropout: float = 0.0  # probability a task fails part-way
    phase: float | None = None  # diurnal: seconds into the day its online time starts
    windows: tuple[tuple[float, float], ...] | None = None  # trace: [start, end) online

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "speed": self.speed, "dropout": self.dropout}
        out["bandwidth"] = None if math.isinf(self.bandwidth) else self.bandwidth  # null: inf
        if self.phase is not None:
            out["phase"] = self.phase
        if self.windows is not None:
            out["windows"] = [list(w) for w in self.windows]
        return out


def population_settings(settings: Any) -> dict[str, Any]:
    """The settings that define a population, JSON-friendly, from a config.Settings or a
    mapping of the keys (missing ones take their defaults)."""
    if not isinstance(settings, Mapping):
        settings = settings.to_dict()
    out = {key: settings.get(key, DEFAULTS.get(key)) for key in POPULATION_KEYS}
    out["DROPOUT"] = float(out["DROPOUT"])
    return out


@dataclass(frozen=True, eq=False)
class Population:
    """The logical clients' profiles, in plan order (client-1 ... client-N), and how
    availability is decided. Held as columns, one float64 per client and attribute (8 B,
    where a profile object took about 250 B); a `ClientProfile` is made when asked for."""

    settings: dict[str, Any]  # POPULATION_KEYS, as given
    speeds: np.ndarray  # compute time multipliers
    bandwidths: np.ndarray  # bytes per second; inf: free
    dropouts: np.ndarray  # probabilities a task fails part-way
    availability: str = "always"  # "always", "diurnal" or "trace"
    online_fraction: float = 1.0  # diurnal: the part of each day a client is online
    phases: np.ndarray | None = None  # diurnal: seconds into the day each client comes online
    windows: tuple[tuple[tuple[float, float], ...], ...] | None = None  # trace: per client

    @classmethod
    def of_profiles(
        cls,
        settings: dict[str, Any],
        profiles: Sequence[ClientProfile],
        availability: str = "always",
        online_fraction: float = 1.0,
    ) -> Population:
        """The population of `profiles` (ids client-1 ... client-N, in order) in columns."""
        _check_ids([c.id for c in profiles])
        column = partial(np.fromiter, dtype=np.float64, count=len(profiles))
        return cls(
            settings,
            column(c.speed for c in profiles),
            column(c.bandwidth for c in profiles),
            column(c.dropout for c in profiles),
            availability,
            online_fraction,
            column(c.phase for c in profiles) if availability == "diurnal" else None,
            tuple(c.windows or () for c in profiles) if availability == "trace" else None,
        )

    @classmethod
    def build(cls, settings: Any, client_ids: Sequence[str], seed: int | None = None) -> Population:
        """The population of `client_ids` (client-1 ... client-N) for `settings` (a Settings
        or a mapping of POPULATION_KEYS); `seed` overrides SEED. A trace file is read here."""
        keys = population_settings(settings)
        if seed is not None:
            keys["SEED"] = int(seed)
        n, seed = len(client_ids), int(keys["SEED"])
        _check_ids(client_ids)
        try:
            speed = parse_spread(str(keys["CLIENT_SPEED"]))
            bandwidth = parse_spread(str(keys["CLIENT_BANDWIDTH"]), base_needed=True, infinite=True)
            availability = availability_setting(str(keys["AVAILABILITY"]))
        except ValueError as exc:
            raise PopulationError(str(exc)) from None
        dropout = keys["DROPOUT"]
        if not 0 <= dropout < 1:
            raise PopulationError(f"DROPOUT is {dropout}, not a probability in [0, 1)")
        speeds = speed.draw(n, np.random.default_rng([seed, _SPEED]), slower_divides=False)
        rates = bandwidth.draw(n, np.random.default_rng([seed, _BANDWIDTH]), slower_divides=True)
        kind, _, arg = availability.partition(":")
        phases: Sequence[float | None] = [None] * n
        windows: Mapping[str, list[tuple[float, float]]] = {}
        fraction = 1.0
        if kind == "diurnal":
            fraction = float(arg) if arg else DIURNAL_FRACTION
            phases = np.random.default_rng([seed, _PHASE]).uniform(0, DAY, n).tolist()
        elif kind == "trace":
            windows = read_trace(Path(arg), client_ids)
        clients = [
            ClientProfile(
                id=cid,
                speed=float(speeds[i]),
                bandwidth=float(rates[i]),
                dropout=dropout,
                phase=phases[i],
                windows=tuple(windows.get(cid, ())) if kind == "trace" else None,
            )
            for i, cid in enumerate(client_ids)
        ]
        return cls.of_profiles(keys, clients, kind, fraction)

    # --- questions -------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.speeds)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Population) and self.to_json() == other.to_json()

    def _profile(self, i: int) -> ClientProfile:
        """Client number i + 1's profile."""
        return ClientProfile(
            id=f"client-{i + 1}",
            speed=float(self.speeds[i]),
            bandwidth=float(self.bandwidths[i]),
            dropout=float(self.dropouts[i]),
            phase=None if self.phases is None else float(self.phases[i]),
            windows=None if self.windows is None else self.windows[i],
        )

    @property
    def clients(self) -> tuple[ClientProfile, ...]:
        """Every client's profile, in plan order (made now: for a few, ask `client`)."""
        return tuple(self._profile(i) for i in range(len(self)))

    def client(self, client: str | ClientProfile) -> ClientProfile:
        return client if isinstance(client, ClientProfile) else self._profile(self._index(client))

    def _index(self, client: str) -> int:
        """The position of "client-N" (N - 1); PopulationError when it is not one of ours."""
        digits = client[7:] if isinstance(client, str) and client.startswith("client-") else ""
        ok = digits.isascii() and digits.isdigit() and not digits.startswith("0")
        if not ok or int(digits) > len(self):
            raise PopulationError(f"{client!r:.40} is not a logical client of this population")
        return int(digits) - 1

    @property
    def uniform(self) -> bool:
        """Everyone equal, always there, never failing: today's behaviour."""
        return (
            self.availability == "always"
            and bool(np.all(self.speeds == 1))
            and bool(np.all(np.isinf(self.bandwidths)))
            and bool(np.all(self.dropouts == 0))
        )

    def compute_seconds(
        self, client: str | ClientProfile, samples: int, epochs: int, per_sample: float
    ) -> float:
        return samples * epochs * per_sample * self.client(client).speed

    def network_seconds(self, client: str | ClientProfile, nbytes: float) -> float:
        return nbytes / self.client(client).bandwidth  # 0.0 at inf

    def duration(
        self,
        client: str | ClientProfile,
        train_samples: int,
        epochs: int,
        bytes_down: float,
        bytes_up: float,
        base_seconds_per_sample: float,
    ) -> float:
        """Simulated seconds of a task: n x E x base x speed + (down + up) / bandwidth."""
        return self.compute_seconds(
            client, train_samples, epochs, base_seconds_per_sample
        ) + self.network_seconds(client, bytes_down + bytes_up)

    def online(self, client: str | ClientProfile, t: float) -> bool:
        """Whether the client is online at simulated second t (t >= 0 from the run's start);
        read from the columns, as the rounds ask it of every client when they sample."""
        i = None if isinstance(client, ClientProfile) else self._index(client)
        if self.availability == "diurnal":
            phase = client.phase if i is None else self.phases[i]  # type: ignore[union-attr,index]
            return bool((t - float(phase)) % DAY < self.online_fraction * DAY)
        if self.availability == "trace":
            windows = client.windows if i is None else self.windows[i]  # type: ignore[union-attr,index]
            return any(lo <= t < hi for lo, hi in windows or ())
        return True

    def next_online(self, client: str | ClientProfile, t: float) -> float | None:
        """The first simulated second >= t at which the client is online; None: never again
        (`online`'s columns, asked of every free client when a flight starts)."""
        i = None if isinstance(client, ClientProfile) else self._index(client)
        if self.availability == "diurnal":
            phase = client.phase if i is None else self.phases[i]  # type: ignore[union-attr,index]
            into = (t - float(phase)) % DAY
            return t if into < self.online_fraction * DAY else t + (DAY - into)
        if self.availability == "trace":
            windows = client.windows if i is None else self.windows[i]  # type: ignore[union-attr,index]
            starts = [max(lo, t) for lo, hi in windows or () if hi > t and hi > lo]
            return min(starts, default=None)
        return t

    def drops(self, client: str | ClientProfile, task_seed: int, attempt: int = 0) -> bool:
        """Whether this attempt of the task fails: the same answer for the same task seed and
        attempt, whoever asks (a task given again after a dropout is a new attempt)."""
        p = self.client(client).dropout
        return p > 0 and drop_draw(task_seed, attempt) < p

    def summary(self) -> dict[str, Any]:
        """For /v1/status: the settings and the spread of speeds and bandwidths (made once)."""
        cached = self.__dict__.get("_summary_made")
        if cached is None:
            cached = self._summary()
            object.__setattr__(self, "_summary_made", cached)
        return dict(cached)

    def _summary(self) -> dict[str, Any]:
        finite = self.bandwidths[np.isfinite(self.bandwidths)]
        return {
            **{k.lower(): v for k, v in self.settings.items() if k != "SEED"},
            "clients": len(self),
            "speed": _spread_summary(self.speeds),
            "bandwidth": _spread_summary(finite) if finite.size else None,
        }

    # --- the file (read back and checked by population_file.from_json) ------------------

    def to_json(self) -> dict[str, Any]:
        body = self._body()
        return {"format": FORMAT, "settings": dict(self.settings), "sha256": _digest(body), **body}

    def _body(self) -> dict[str, Any]:
        how: dict[str, Any] = {"mode": self.availability}
        if self.availability == "diurnal":
            how |= {"fraction": self.online_fraction, "day": DAY}
        return {"availability": how, "clients": [c.to_json() for c in self.clients]}


def _check_ids(client_ids: Sequence[str]) -> None:
    """A population's clients are the plan's: client-1 ... client-N, in order."""
    for i, cid in enumerate(client_ids, 1):
        if cid != f"client-{i}":
            raise PopulationError(
                f"client {i} is {cid!r:.40}: a population's clients are client-1 ... client-N"
            )


def drop_draw(task_seed: int, attempt: int) -> float:
    """A uniform [0, 1) draw of one attempt of a task, from its seed alone."""
    return float(np.random.default_rng([task_seed, attempt, _DROP]).random())


def _spread_summary(values: np.ndarray) -> dict[str, float]:
    return {
        "min": float(values.min()),
        "median": float(np.median(values)),
        "mean": float(values.mean()),
        "max": float(values.max()),
    }


def _digest(body: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of the file's content (availability and clients)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()
