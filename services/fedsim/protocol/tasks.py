"""The work a worker is given: a training or an evaluation task, in the answer `Offer`."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from fedsim.protocol.base import (
    Invalid,
    client_number,
    count,
    optional,
    record_json,
    task_head,
    task_tail,
    typed,
)
from fedsim.protocol.secagg import Masking, SecaggTask

DEFAULT_MOMENTUM = 0.9  # sgd's heavy-ball momentum unless MOMENTUM says otherwise


@dataclass(frozen=True)
class TrainSettings:
    """How a client trains: the aggregator's settings, plus what its rule adds (FedProx's μ).

    `proximal_mu` None (absent) and 0 both train the plain model; `model` None
    leaves the choice to the worker's own MODEL. A rule's client settings
    (`Strategy.client_settings`) must be fields here: other keys are not sent.
    """

    OMITTED: ClassVar[tuple[str, ...]] = ("model", "proximal_mu", "momentum")
    epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    model: str | None = None
    proximal_mu: float | None = None
    momentum: float | None = None  # sgd's; None (sent by none before MOMENTUM): 0.9

    @property
    def sgd_momentum(self) -> float:
        return DEFAULT_MOMENTUM if self.momentum is None else self.momentum

    @property
    def mu(self) -> float:
        return self.proximal_mu or 0.0

    def to_json(self) -> dict[str, Any]:
        return record_json(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainSettings:
        mu = data.get("proximal_mu")
        if mu is not None and (
            isinstance(mu, bool) or not isinstance(mu, numbers.Real) or not 0 <= mu < math.inf
        ):
            raise Invalid("bad_task", f"proximal_mu must be a finite number >= 0, got {mu!r}")
        rate = typed(data, "learning_rate", int, float)
        if not 0 < rate < math.inf:
            raise Invalid("bad_task", f"learning_rate must be a finite number > 0, got {rate!r}")
        momentum = optional(data, "momentum", int, float)
        if momentum is not None and not 0 <= momentum < 1:
            raise Invalid("bad_task", f"momentum must be a number >= 0 and < 1, got {momentum!r}")
        return cls(
            epochs=count(data, "epochs", lo=1),
            batch_size=count(data, "batch_size", lo=1),
            learning_rate=float(rate),
            optimizer=typed(data, "optimizer", str),
            model=optional(data, "model", str),
            proximal_mu=None if mu is None else float(mu),
            momentum=None if momentum is None else float(momentum),
        )

    @classmethod
    def of(cls, value: TrainSettings | Mapping[str, Any]) -> TrainSettings:
        """`value` itself, or the settings its JSON form describes."""
        return value if isinstance(value, TrainSettings) else cls.from_json(value)


def training_json(settings: Any, rule: Mapping[str, Any]) -> dict[str, Any]:
    """The `training` every task of a run carries, in TrainSettings' JSON form: the run's
    MODEL, EPOCHS, BATCH_SIZE, LEARNING_RATE, MOMENTUM and OPTIMIZER, and what its rule
    adds (`Strategy.client_settings()`, e.g. FedProx's proximal_mu)."""
    return {
        "model": settings.model,
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate,
        "momentum": settings.momentum,
        "optimizer": settings.optimizer,
        **rule,
    }


@dataclass(frozen=True)
class Attack:
    """What an attacking client does to its update (`fedsim.pipeline.attacks`), and its seed."""

    kind: str
    scale: float
    seed: int

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "scale": self.scale, "seed": self.seed}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Attack:
        scale = float(typed(data, "scale", int, float))
        return cls(typed(data, "kind", str), scale, count(data, "seed"))


@dataclass(frozen=True)
class Profile:
    """How the task's logical client behaves (its line of clients.json) and how the worker
    acts it out: under CLOCK=real it waits as a client of this speed and bandwidth would
    (`fedsim.client.pacing`); a task that drops is given back (abort) or left (silent)."""

    speed: float = 1.0  # compute time multiplier
    bandwidth: float | None = None  # bytes per second; None: unlimited
    dropout: float = 0.0
    dropout_mode: str = "abort"  # or "silent"
    clock: str = "real"  # or "virtual"
    time_scale: float = 1.0  # simulated seconds per real second

    def to_json(self) -> dict[str, Any]:
        return record_json(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Profile:
        def number(key: str, lo: float, hi: float = math.inf) -> float:
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise Invalid("bad_task", f"profile {key} must be a number, got {value!r:.40}")
            if not (lo < value < hi and math.isfinite(value)) and not (
                key == "dropout" and value == 0
            ):
                raise Invalid("bad_task", f"profile {key} is {value!r:.40}, out of range")
            return float(value)

        bandwidth = data.get("bandwidth")
        mode, clock = data.get("dropout_mode"), data.get("clock")
        if mode not in ("abort", "silent") or clock not in ("real", "virtual"):
            raise Invalid(
                "bad_task", "profile dropout_mode must be abort or silent, clock real or virtual"
            )
        return cls(
            speed=number("speed", 0),
            bandwidth=None if bandwidth is None else number("bandwidth", 0),
            dropout=number("dropout", 0, 1),
            dropout_mode=mode,
            clock=clock,
            time_scale=number("time_scale", 0),
        )


@dataclass(frozen=True)
class TrainTask:
    """Train logical client `client` on its samples from `base_version`, then push.

    Its samples: the client's part of `partition` (the plan's settings), checked
    against `sha256`; under PARTITION=slices only slice `slice` of the range
    `slices`. `samples` is how many images that is, `seed` the task's shuffling.
    """

    kind: ClassVar[str] = "train"
    OMITTED: ClassVar[tuple[str, ...]] = (
        "slice", "slices", "attack", "profile", "attempt", "run", "secagg",
    )  # fmt: skip
    id: str
    lease: str
    client: str
    samples: int
    sha256: str
    base_version: int
    seed: int
    train: TrainSettings
    partition: dict[str, Any]
    round: int | None = None  # round rules: the round it belongs to
    slice: int | None = None
    slices: str | None = None  # "5-8": the client's range, for log lines
    attack: Attack | None = None  # only an attacker's tasks carry one
    worker: str = ""  # the short name of the worker it was given to
    timeout: float = 0.0  # TASK_TIMEOUT: the lease runs out after it
    # The client's population profile; None (absent): everyone equal, always there.
    profile: Profile | None = None
    attempt: int | None = None  # how often the task was given before and dropped; None: 0
    run: str | None = None  # the run's id: what a worker keeps across tasks is tagged with it
    secagg: Masking | None = None  # SECAGG=true: mask the update (protocol/secagg.py)

    @property
    def client_number(self) -> int:
        number = client_number(self.client)
        assert number is not None
        return number

    def to_json(self) -> dict[str, Any]:
        return record_json(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainTask:
        task_id, lease = task_head(data)
        client = typed(data, "client", str)
        if client_number(client) is None:
            raise Invalid("bad_task", f"task {task_id} names {client!r:.40}, not client-N")
        attack = optional(data, "attack", dict)
        profile = optional(data, "profile", dict)
        attempt = optional(data, "attempt", int)
        if attempt is not None and attempt < 0:
            raise Invalid("bad_task", f"task {task_id}: attempt must be >= 0, got {attempt}")
        masking = optional(data, "secagg", dict)
        return cls(
            id=task_id,
            lease=lease,
            client=client,
            samples=count(data, "samples"),
            sha256=typed(data, "sha256", str),
            base_version=count(data, "base_version"),
            seed=count(data, "seed"),
            train=TrainSettings.from_json(typed(data, "train", dict)),
            partition=typed(data, "partition", dict),
            round=optional(data, "round", int),
            slice=optional(data, "slice", int),
            slices=optional(data, "slices", str),
            attack=None if attack is None else Attack.from_json(attack),
            run=_run(data),
            profile=None if profile is None else Profile.from_json(profile),
            attempt=attempt,
            secagg=None if masking is None else Masking.from_json(masking),
            **task_tail(data),
        )


@dataclass(frozen=True)
class EvalTask:
    """Score global model version `version` on the test set, then report an `Evaluation`."""

    kind: ClassVar[str] = "evaluate"
    id: str
    lease: str
    version: int
    worker: str = ""
    timeout: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return record_json(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EvalTask:
        task_id, lease = task_head(data)
        return cls(task_id, lease, count(data, "version"), **task_tail(data))


Task = TrainTask | EvalTask | SecaggTask


def task_from_json(data: Mapping[str, Any]) -> Task:
    """The task a JSON object describes, by its `kind`."""
    kind = data.get("kind")
    if kind == TrainTask.kind:
        return TrainTask.from_json(data)
    if kind == EvalTask.kind:
        return EvalTask.from_json(data)
    if kind == SecaggTask.kind:
        return SecaggTask.from_json(data)
    raise Invalid("bad_task", f"a task of unknown kind {kind!r:.40}")


def _run(data: Mapping[str, Any]) -> str | None:
    run = optional(data, "run", str)
    if run is not None and not (1 <= len(run) <= 64 and run.isascii() and run.isalnum()):
        raise Invalid("bad_task", "a task's run must be 1-64 ASCII letters and digits")
    return run


@dataclass(frozen=True)
class Offer:
    """The answer to a request for work: a task, or why there is none and when to ask again."""

    task: Task | None
    finished: bool = False  # the run is over: the worker exits
    surplus: bool = False  # all the work is held by other workers: it may exit
    reason: str = ""
    retry_after: float = 0.5
    worker: str = ""  # the asking worker's short name

    def to_json(self) -> dict[str, Any]:
        return record_json(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Offer:
        """Lenient but for the task: a task that breaks the protocol raises Invalid."""
        task = data.get("task")
        return cls(
            task_from_json(task) if isinstance(task, dict) else None,
            finished=bool(data.get("finished")),
            surplus=bool(data.get("surplus")),
            reason=str(data.get("reason") or ""),
            retry_after=float(data.get("retry_after") or 0.5),
            worker=str(data.get("worker") or ""),
        )
