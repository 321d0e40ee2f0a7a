"""`python -m fedsim.prepare`: make the data and the first checkpoint ready.

Verifies (or downloads) the four MNIST files in DATA_DIR, and when MODEL_DIR
holds no checkpoint writes version 0: the seeded initial weights of MODEL, so
every run with the same SEED starts from the same model. The resolved settings
are saved beside the checkpoints as settings.json.
"""

from __future__ import annotations

import json
import logging
import sys

from fedsim import checkpoints, cli, config, models, weights
from fedsim.client.training import quiet_tensorflow
from fedsim.data import mnist

log = logging.getLogger("fedsim.prepare")


def _reset_hint(settings: config.Settings) -> str:
    return f"reset with 'docker compose down -v', or delete {settings.model_dir} for a local run"


def _main() -> int:
    settings = config.load()
    mnist.ensure(settings.data_dir, settings.mnist_mirrors, verify=settings.data_verify)
    log.info("data ok in %s", settings.data_dir)

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
        if sorted(weights.layout_of(newest.tensors)) != sorted(layout):
            raise config.ConfigError(
                "MODEL",
                settings.model,
                f"checkpoint {newest.path} holds a different model "
                f"({newest.metadata.get('model', 'unknown')}); {_reset_hint(settings)}",
            )
        log.info("checkpoint %s (version %d) exists: left as it is", newest.path, newest.version)
    else:
        quiet_tensorflow()
        model = models.from_settings(settings)
        path = checkpoints.save(
            settings.model_dir,
            0,
            models.get_weights(model),
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
