"""The update pipeline: an update's path from local training to the rule, and the aggregate's
from the rule to the served model, as an ordered list of stages.

```
worker:      [relabel] -> train -> delta -> attack -> clip -> local noise -> compress
             -> [mask] -> push
aggregator:  receive -> decompress onto the base -> validate -> [unmask, per round]
             -> clip re-check, per round -> equal-weight mean + central noise, per round
             -> rule.aggregate -> finite -> publish
```

Each stage is one module with a worker side and an aggregator side (`base.Stage`);
`registry.build(settings)` picks those that run and orders them. The aggregator's
state, the task queue and the rules do not know which stages run: a new stage is
its module, its line in `registry.REGISTRY` and its tests. Importable by both
processes: numpy and safetensors only, no Flask, no TensorFlow, nothing from the
aggregator.

| stage | module | worker side | aggregator side |
|---|---|---|---|
| attack | attacks.py | label-flip before training; scaled, noise after | none |
| clip | clip.py | clip w - w_t to DP_CLIP; DP=local: then noise | none |
| dp | dp.py | none | gather: clip every update again, equal-weight mean, central noise |
| secagg | secagg/ | mask the delta (the last change) | none: aggregator/secure.py unmasks a round |
| validate | checks.py | none | layout, float32, finite, abs(w) <= MAX_WEIGHT |
| compress | compress.py | encode w - w_t (fp16, int8, top-k with error feedback) | check the codec's bounds, decode onto the base |
| finite | checks.py | none | the aggregate finite and bounded |
"""

from __future__ import annotations

from fedsim.pipeline.base import Outgoing, Rejected, Stage, Upload
from fedsim.pipeline.checks import MAX_WEIGHT, check_update, publishable
from fedsim.pipeline.registry import REGISTRY, Pipeline, build, names, parse_names, stage_class

__all__ = [
    "MAX_WEIGHT",
    "REGISTRY",
    "Outgoing",
    "Pipeline",
    "Rejected",
    "Stage",
    "Upload",
    "build",
    "check_update",
    "names",
    "parse_names",
    "publishable",
    "stage_class",
]
