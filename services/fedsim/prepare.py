"""`python -m fedsim.prepare`: make the data and the first checkpoint ready.

Verifies (or downloads) the four MNIST files in DATA_DIR; writes the partition
plan to MODEL_DIR/partitions.json and the population of its clients to
clients.json when there are none (and refuses settings that differ from existing
ones); and when MODEL_DIR holds no checkpoint writes
version 0: the seeded initial weights of MODEL, so every run with the same SEED
starts from the same model. The resolved settings are saved beside the
checkpoints as settings.json, and TOKENS_FILE is created with a workers' token
when there is none. It imports no TensorFlow, so it starts in a moment.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
from pathlib import Path

from fedsim import checkpoints, cli, config, models, tokens, weights
from fedsim.data import mnist, partition, population_file
from fedsim.data.population import Population, PopulationError

log = logging.getLogger("fedsim.prepare")


def _reset_hint(settings: config.Settings) -> str:
    return f"reset with `docker compose down -v` (local runs: delete {settings.model_dir})"


def _owner_only(path: Path) -> bool:
    """Make an existing tokens file readable by its owner only (an older run made it 0644).
    True when its mode changed. A new one is created 0600 (tokens.ensure)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if not mode & 0o077:
        return False
    os.chmod(path, mode & 0o600)
    return True


def _ensure_partitions(settings: config.Settings) -> None:
    """Write partitions.json when absent; refuse settings that differ from an existing one."""
    path = settings.model_dir / partition.FILE
    plan = partition.plan_settings(settings)
    if path.exists():
        try:
            content = partition.read(settings.model_dir)
        except partition.PartitionError as exc:
            raise partition.PartitionError(f"{exc}; {_reset_hint(settings)}") from None
        diffs = partition.differences(content, settings)
        if diffs:
            key = next(k for k in plan if content["settings"].get(k) != plan[k])
            raise config.ConfigError(
                key,
                str(plan[key]),
                f"{path} was made with other settings ({'; '.join(diffs)}); "
                f"{_reset_hint(settings)} or change it back",
            )
        log.info("%s matches the settings: left as it is", partition.FILE)
    else:
        labels = mnist.load_file(settings.data_dir, "train-labels", verify=settings.data_verify)
        content = partition.manifest(plan, partition.make(plan, labels), labels)
        log.info("wrote %s", partition.write(settings.model_dir, content))
    log.info("%s", partition.summary(content))
    _ensure_population(settings, [c["id"] for c in content["clients"]])


def _ensure_population(settings: config.Settings, client_ids: list[str]) -> None:
    """Write clients.json when absent; refuse settings that differ from an existing one."""
    path = settings.model_dir / population_file.FILE
    try:
        if path.exists():
            found = population_file.read(settings.model_dir)
            population_file.check_clients(found, client_ids)
        else:
            found = Population.build(settings, client_ids)
            log.info("wrote %s", population_file.write(settings.model_dir, found))
    except PopulationError as exc:
        raise PopulationError(f"{exc}; {_reset_hint(settings)}") from None
    diffs = population_file.differences(found, settings)
    if diffs:
        key = diffs[0].split(" ", 1)[0]
        raise config.ConfigError(
            key,
            str(settings.to_dict()[key]),
            f"{path} was made with other settings ({'; '.join(diffs)}); "
            f"{_reset_hint(settings)} or change it back",
        )
    summary = found.summary()
    log.info(
        "population: speed %s, bandwidth %s, dropout %g, availability %s",
        summary["client_speed"],
        summary["client_bandwidth"],
        summary["dropout"],
        summary["availability"],
    )


def _main() -> int:
    settings = config.load()
    mnist.ensure(settings.data_dir, settings.mnist_mirrors, verify=settings.data_verify)
    log.info("data ok in %s", settings.data_dir)
    _ensure_partitions(settings)

    layout = models.SHAPES[settings.model]
    existing = checkpoints.versions(settings.model_dir)
    if existing:
        newest = checkpoints.load_newest(settings.model_dir)
        if newest is None:
            raise config.ConfigError(
                "MODEL_DIR",
                str(settings.model_dir),
                f"holds checkpoints {existing[:3]} but none reads back whole; "
                + _reset_hint(settings),
            )
        if sorted(weights.layout_of(checkpoints.split(newest.tensors)[0])) != sorted(layout):
            raise config.ConfigError(
                "MODEL",
                settings.model,
                f"checkpoint {newest.path} holds a different model "
                f"({newest.metadata.get('model', 'unknown')}); {_reset_hint(settings)}",
            )
        log.info("checkpoint %s (version %d) exists: left as it is", newest.path, newest.version)
    else:
        path = checkpoints.save(
            settings.model_dir,
            0,
            models.initial_weights(settings.model, settings.seed),
            {
                "version": 0,
                "samples": 0,
                "model": settings.model,
                "strategy": settings.aggregation,
                "seed": settings.seed,
            },
            keep=settings.keep_checkpoints,
        )
        log.info("wrote %s: initial %s weights from SEED=%d", path, settings.model, settings.seed)

    if tokens.ensure(settings.tokens_file):
        log.info("wrote %s with a token for the workers", settings.tokens_file)
    elif _owner_only(settings.tokens_file):
        log.info(
            "tokens in %s: readable by others until now, made readable by its owner only",
            settings.tokens_file,
        )
    else:
        log.info("tokens in %s: left as they are", settings.tokens_file)

    settings_path = settings.model_dir / "settings.json"
    checkpoints.write_atomic(
        settings_path, (json.dumps(settings.to_dict(), indent=2) + "\n").encode()
    )
    log.info("settings saved in %s", settings_path)
    return 0


def main() -> None:
    cli.setup_logging()
    sys.exit(cli.run("prepare", _main))


if __name__ == "__main__":
    main()
