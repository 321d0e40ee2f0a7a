"""What every command shares: logging, and one clear line for a bad setting or file."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from fedsim.config import ConfigError
from fedsim.data.mnist import DataError
from fedsim.tokens import TokenError
from fedsim.weights import WeightsError


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )


def run(command: str, main: Callable[[], int | None]) -> int:
    """Run `main`; a known error becomes one line on stderr and a non-zero exit code."""
    try:
        return main() or 0
    except ConfigError as exc:
        print(f"fedsim {command}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except (DataError, WeightsError, TokenError) as exc:
        print(f"fedsim {command}: error: {exc}", file=sys.stderr, flush=True)
        return 1
