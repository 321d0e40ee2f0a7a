"""The running parts an aggregator is built from its Start: the update pipeline's
stages, the rule and the task queue, each with the state the checkpoint saved of it.

persistence.py reads MODEL_DIR (the Start); this module makes the objects the
state holds from it, and refuses (StartupError, one line) a saved state these
settings cannot take: a checkpoint made with other DP settings, a stage's state
for a stage that no longer runs, a bad rule or queue state.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from fedsim import pipeline
from fedsim.aggregator import privacy, strategies, tasks
from fedsim.aggregator.persistence import Start, StartupError, profiles, reset_hint
from fedsim.aggregator.strategies import Strategy
from fedsim.aggregator.tasks import Client
from fedsim.aggregator.tasks.clock import RealClock, VirtualClock
from fedsim.aggregator.tasks.flights import FlightQueue
from fedsim.aggregator.tasks.secagg import SecaggQueue
from fedsim.config import Settings
from fedsim.data.population import Population
from fedsim.models import SHAPES
from fedsim.protocol.tasks import training_json


def stages(settings: Settings, start: Start) -> pipeline.Pipeline:
    """The update pipeline's stages, with the state the checkpoint saved of them (the DP
    settings in force, adaptive clipping's norm). A checkpoint whose rounds were made with
    other DP settings is refused, as is one with the state of a stage that no longer runs.
    Raises StartupError."""
    saved = dict(start.stages_state) if isinstance(start.stages_state, dict) else {}
    rounds = start.tasks_state.get("rounds_done", 0)
    rounds = rounds if isinstance(rounds, int) else 0  # the queue refuses a bad one
    problem = privacy.resume_problem(settings, saved.get("dp"), rounds)
    if problem is not None:
        raise StartupError(f"checkpoint {start.checkpoint.path}: {problem}; {reset_hint(settings)}")
    if rounds <= 0:
        saved.pop("dp", None)  # no round was made under it: nothing to account for
    built = pipeline.build(settings)
    try:
        built.load_state_dict(saved)
    except (ValueError, TypeError) as exc:
        raise StartupError(
            f"checkpoint {start.checkpoint.path} has a pipeline state these settings cannot "
            f"take: {exc}; {reset_hint(settings)}"
        ) from None
    for stage in built.stages:
        if stage.name == "dp" and settings.dp == "central":
            try:  # the central noise's key, made or read now: a bad key file stops the start
                stage.key()  # type: ignore[attr-defined]
            except ValueError as exc:
                raise StartupError(str(exc)) from None
    return built


def restore(
    settings: Settings,
    start: Start,
    *,
    clock: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
) -> tuple[Strategy, tasks.Queue]:
    """The rule and the task queue, each with the state the checkpoint saved of it.
    Raises StartupError."""
    strategy = strategies.build(settings)
    try:
        if start.strategy_state:
            strategy.load_state_dict(start.strategy_state)
        strategy.load_tensor_state(start.strategy_tensors)
    except (ValueError, TypeError, KeyError) as exc:
        raise StartupError(f"checkpoint has a bad strategy state: {exc}") from None
    queue = make_queue(
        settings,
        start.clients,
        strategy,
        partition=start.manifest["settings"],
        clock=clock,
        wall=wall,
        profiles=profiles(settings, start.population),
        run_clock=run_clock(settings, clock),
        online=_online(start.population),
        next_online=_next_online(start.population),
    )
    try:
        queue.load_state_dict(start.tasks_state)
        queue.load_attempts(start.tasks_state.get("attempts"))
        queue.run_clock.load_state_dict(start.tasks_state.get("clock") or {})
    except (ValueError, TypeError, KeyError) as exc:
        raise StartupError(f"checkpoint has a bad task state: {exc}") from None
    return strategy, queue


def run_clock(settings: Settings, clock: Callable[[], float]) -> RealClock | VirtualClock:
    """The run's clock: simulated time (CLOCK=virtual), or the real one x TIME_SCALE."""
    if settings.clock == "virtual":
        return VirtualClock()
    return RealClock(clock, settings.time_scale)


def _online(found: Population | None) -> Callable[[int, float], bool] | None:
    """Who is online at a time on the run's clock, for the rounds' sampling; None: all."""
    if found is None or found.availability == "always":
        return None
    return lambda number, t: found.online(f"client-{number}", t)


def _next_online(found: Population | None) -> Callable[[int, float], float | None] | None:
    """When a client is next online on the run's clock, for the flights; None: always."""
    if found is None or found.availability == "always":
        return None
    return lambda number, t: found.next_online(f"client-{number}", t)


def make_queue(
    settings: Settings,
    clients: Sequence[Client],
    strategy: Strategy,
    online: Callable[[int, float], bool] | None = None,
    next_online: Callable[[int, float], float | None] | None = None,
    **kw: Any,
) -> tasks.Queue:
    """The task queue the rule and settings call for: rounds of sampled clients for a round
    rule; slices in order (PARTITION=slices), clients in flight on the simulated clock
    (CLOCK=virtual) or sampled clients for an asynchronous one."""
    common = {
        "seed": settings.seed,
        "per_round": settings.per_round,
        # Under DP, DP_EPSILON_BUDGET may stop the run before ROUNDS (aggregator/privacy.py).
        "rounds": privacy.rounds_allowed(settings),
        "task_timeout": settings.task_timeout,
        "key": tasks.lease_key(settings.model_dir),  # leases signed before a restart still count
        "training": training_json(settings, strategy.client_settings()),
        **kw,
    }
    if settings.attack != "none":
        common["attack"] = {"kind": settings.attack, "scale": settings.attack_scale}
        common["attackers"] = tasks.choose_attackers(
            settings.seed, settings.attackers, len(clients)
        )
    if strategy.mode == "rounds" and settings.secagg:
        size = sum(math.prod(shape) for _, shape in SHAPES[settings.model])
        return SecaggQueue(
            clients,
            quorum=settings.round_quorum,
            deadline=settings.round_deadline,
            threshold=settings.secagg_t,
            size=size,
            equal_weights=settings.dp != "off",
            **common,
        )
    if strategy.mode == "rounds":
        return tasks.RoundQueue(
            clients,
            quorum=settings.round_quorum,
            deadline=settings.round_deadline,
            overselect=settings.overselect,
            online=online,
            **common,
        )
    if settings.partition == "slices":
        return tasks.SliceQueue(clients, **common)
    if settings.clock == "virtual":
        return FlightQueue(clients, next_online=next_online, **common)
    return tasks.SampledQueue(clients, **common)
