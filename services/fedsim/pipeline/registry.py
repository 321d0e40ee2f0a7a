"""Which stages run, and in what order: a lazy table from names to modules, read from settings.

`REGISTRY` lists the stages in the worker's order; each stage's module is imported
on first use (as pip's command table). Every aggregator side undoes or re-checks
its worker side, so a received update goes through the stages in reverse (the
last transform undone first, and `validate` first of all), and the aggregate is
published through them in order (central noise before the finite check).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from fedsim.pipeline.base import Outgoing, Stage, Tensors, Upload

REGISTRY: dict[str, str] = {
    "attack": "fedsim.pipeline.attacks:Attack",
    "clip": "fedsim.pipeline.clip:Clip",  # DP: the worker clips, then (DP=local) noises
    "dp": "fedsim.pipeline.dp:CentralNoise",  # DP: on gather, re-clip, mean, central noise
    "secagg": "fedsim.pipeline.secagg.stage:Mask",  # SECAGG: mask the delta (never compressed)
    "validate": "fedsim.pipeline.checks:Validate",
    # After validate: on receive (reversed) the codec is decoded first, then validated.
    "compress": "fedsim.pipeline.compress:Compress",
    "finite": "fedsim.pipeline.checks:Finite",
}


def names() -> tuple[str, ...]:
    """Every stage's name, in the worker's order."""
    return tuple(REGISTRY)


def parse_names(raw: str) -> tuple[str, ...]:
    """A comma- or space-separated list of stage names, any case; ValueError with a suggestion."""
    return tuple(dict.fromkeys(_known(name) for name in raw.replace(",", " ").split()))


def stage_class(name: str) -> type[Stage]:
    """The class registered as `name`, its module imported on first use."""
    module, cls = REGISTRY[_known(name)].split(":")
    return getattr(importlib.import_module(module), cls)


def build(settings: Any) -> Pipeline:
    """Every registered stage that runs in these settings, in the registry's order."""
    stages = []
    for name in REGISTRY:
        stage = stage_class(name).from_settings(settings)
        if stage is not None:
            stages.append(stage)
    return Pipeline(stages)


def _known(raw: str) -> str:
    name = raw.strip().lower()
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"unknown stage {name!r}: one of {', '.join(REGISTRY)}{hint}")
    return name


class Pipeline:
    """The stages of one run; each method runs one side of them, in its order."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = tuple(stages)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(stage.name for stage in self.stages)

    # --- worker: relabel -> train -> worker sides -> push ------------------------------

    def relabel(self, task: Mapping[str, Any], labels: np.ndarray) -> np.ndarray | None:
        """The labels to train on, or None when every stage keeps the data set's."""
        changed = None
        for stage in self.stages:
            out = stage.relabel(task, labels if changed is None else changed)
            changed = changed if out is None else out
        return changed

    def worker(self, update: Outgoing) -> Outgoing:
        for stage in self.stages:
            update = stage.worker(update)
        return update

    # --- aggregator: receive (reversed) -> gather (reversed) -> rule -> publish --------

    @property
    def dtypes(self) -> frozenset[str]:
        """The safetensors dtypes an upload may hold: F32, and what a codec sends."""
        return frozenset({"F32"}).union(*(stage.dtypes for stage in self.stages))

    @property
    def wants_base(self) -> bool:
        """Whether a stage decodes an update onto its base (recent versions are kept)."""
        return any(stage.wants_base for stage in self.stages)

    def receive(self, tensors: Tensors, upload: Upload | None = None) -> Tensors:
        upload = upload or Upload()
        for stage in reversed(self.stages):
            tensors = stage.receive(stage.decode(tensors, upload))
        return tensors

    def gather(self, batch: Sequence[Tensors], base: Tensors, round_no: int) -> Sequence[Tensors]:
        for stage in reversed(self.stages):
            batch = stage.gather(batch, base, round_no)
        return batch

    def publish(self, tensors: Tensors) -> Tensors:
        for stage in self.stages:
            tensors = stage.publish(tensors)
        return tensors

    # --- state: {stage: its state}, tensors named "<stage>/<its name>" -----------------

    def state_dict(self) -> dict[str, Any]:
        return {s.name: state for s in self.stages if (state := s.state_dict())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = sorted(set(state) - set(self.names))
        if unknown:
            raise ValueError(f"saved state of stages that do not run: {', '.join(unknown)}")
        for stage in self.stages:
            stage.load_state_dict(state.get(stage.name, {}))

    @contextlib.contextmanager
    def kept_on_error(self) -> Iterator[None]:
        """Run a block; when it raises, put every stage's state back as it was before it
        (a refused round leaves adaptive clipping's norm where it was)."""
        state = json.loads(json.dumps(self.state_dict()))
        tensors = {key: np.array(t, copy=True) for key, t in self.tensor_state().items()}
        try:
            yield
        except BaseException:
            self.load_state_dict(state)
            self.load_tensor_state(tensors)
            raise

    def tensor_state(self) -> dict[str, np.ndarray]:
        return {
            f"{stage.name}/{key}": tensor
            for stage in self.stages
            for key, tensor in stage.tensor_state().items()
        }

    def load_tensor_state(self, tensors: Tensors) -> None:
        mine: dict[str, dict[str, np.ndarray]] = {name: {} for name in self.names}
        for key, tensor in tensors.items():
            name, _, rest = key.partition("/")
            if name not in mine or not rest:
                raise ValueError(f"saved tensor {key!r} belongs to no stage that runs")
            mine[name][rest] = tensor
        for stage in self.stages:
            stage.load_tensor_state(mine[stage.name])
