"""`python -m fedsim.data`: make sure the four MNIST files are in DATA_DIR.

Verifies them (SHA-256 unless DATA_VERIFY=false) and downloads the missing ones
from MNIST_MIRRORS, the data half of `fedsim.prepare`. On Kubernetes every
worker pod runs it as an init container into a pod-local emptyDir, so no
volume has to be shared between nodes (deploy/kubernetes/client-job.yaml).
Exit codes as for every command: 0 ready, 1 a data error, 2 a bad setting.
"""

from __future__ import annotations

import logging
import sys

from fedsim import cli, config
from fedsim.data import mnist

log = logging.getLogger("fedsim.data")


def _main() -> int:
    settings = config.load()
    mnist.ensure(settings.data_dir, settings.mnist_mirrors, verify=settings.data_verify)
    log.info("data ok in %s", settings.data_dir)
    return 0


def main() -> None:
    cli.setup_logging()
    sys.exit(cli.run("data", _main))


if __name__ == "__main__":
    main()
