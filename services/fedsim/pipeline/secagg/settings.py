"""What SECAGG=true runs with, and the combinations refused at settings load, in one line each.

Masked updates can only be summed: a rule must need nothing but the round's weighted
sum of deltas (fedavg, fedprox and the server optimizers fedavgm, fedadam, fedyogi,
fedadagrad). Refused: robust rules (they look at single updates), asynchronous rules
(an update is mixed in alone, so its sum is itself), attacks (the simulation of an
attacker's update is not what masking is about), compression (a codec's output is
not a fixed-point vector). DP runs with the clip on the workers (the aggregator cannot
re-check a masked update's norm; adaptive clipping, which needs DP_CLIP_AT=aggregator,
is refused with it); see docs/secagg.md.
"""

from __future__ import annotations

from typing import Any

from fedsim.settings import ConfigError

SUMS = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")


def check_settings(s: Any) -> None:
    """Raise ConfigError naming the key to change, when SECAGG=true cannot run with `s`."""
    if not s.secagg:
        if s.secagg_threshold:
            raise ConfigError(
                "SECAGG_THRESHOLD", str(s.secagg_threshold), "a threshold needs SECAGG=true"
            )
        return
    rule = s.aggregation
    if rule not in SUMS:
        raise ConfigError(
            "SECAGG",
            "true",
            f"AGGREGATION={rule} needs single updates, which secure aggregation hides: use one "
            f"of {', '.join(SUMS)}",
        )
    if s.attack != "none":
        raise ConfigError(
            "SECAGG",
            "true",
            f"ATTACK={s.attack}: attacks are not simulated under secure aggregation",
        )
    if s.dp == "central" and s.dp_clip_at != "worker":
        raise ConfigError(
            "DP_CLIP_AT",
            s.dp_clip_at,
            "under SECAGG the aggregator sees no single update to clip: clip on the workers "
            "(DP_CLIP_AT=worker)",
        )
    compression = getattr(s, "compression", "none")
    if compression != "none":
        raise ConfigError(
            "SECAGG",
            "true",
            f"COMPRESSION={compression}: masked updates are fixed-point words, not a codec's "
            "output; set COMPRESSION=none",
        )
    for key, value, plain in (
        ("OVERSELECT", f"{getattr(s, 'overselect', 1.0):g}", "1"),
        ("CLOCK", getattr(s, "clock", "real"), "real"),
    ):
        if value != plain:
            raise ConfigError(
                "SECAGG",
                "true",
                f"{key}={value}: a secure round's phases wait for the clients they sampled, "
                f"on the real clock; set {key}={plain}",
            )
    if getattr(s, "round_deadline", None) == "auto":
        raise ConfigError(
            "SECAGG",
            "true",
            "ROUND_DEADLINE=auto: give secure rounds a deadline in seconds, or off",
        )
    m = s.per_round
    if m < 3:
        raise ConfigError(
            "SECAGG", "true", f"{m} clients per round: secure aggregation needs at least 3"
        )
    t = s.secagg_t
    if not m // 2 < t <= m:
        raise ConfigError(
            "SECAGG_THRESHOLD",
            str(s.secagg_threshold),
            f"must be more than half of and at most the {m} clients per round "
            f"({m // 2 + 1}..{m}); 0 means two thirds",
        )
