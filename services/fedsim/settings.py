"""The setting machinery: a row per setting, the error a bad value raises, and the parsers.

A `Setting` is one row of the table: its key, its default as written in `.env`,
a parser from the raw string to the value, and one line on what it does. The
table itself is in `fedsim.settings_table`; the aggregation rules add their rows
from their registry. Every parser raises ValueError whose message says what is
allowed ("an integer >= 1"), which `fedsim.config.load` turns into one line
naming the key and the value. This module imports nothing else of fedsim, so
both the table and the rules can use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse


class ConfigError(ValueError):
    """A setting has a value fedsim cannot use."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"invalid setting {key}={value!r}: {allowed}")


@dataclass(frozen=True)
class Setting:
    key: str
    default: str
    parse: Callable[[str], Any]
    why: str  # one line: what it is and why this default


@dataclass(frozen=True)
class Group:
    """Settings shown together in `.env.example`, the README's table and the manifests."""

    title: str
    rows: tuple[Setting, ...]
    note: str = ""  # a few words above the group in `.env.example`


# --- parsers: str -> value, raising ValueError with what is allowed ------------------


def integer(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An integer in [lo, hi]."""
    allowed = f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")

    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(allowed) from None
        if value < lo or (hi is not None and value > hi):
            raise ValueError(allowed)
        return value

    return parse


def number(
    lo: float, hi: float | None = None, *, above: bool = False, below: bool = False
) -> Callable[[str], float]:
    """A finite float in [lo, hi]; `above`/`below` exclude lo/hi."""
    allowed = f"a number {'>' if above else '>='} {lo:g}"
    if hi is not None:
        allowed += f" and {'<' if below else '<='} {hi:g}"

    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(allowed) from None
        if not math.isfinite(value) or value < lo or (above and value == lo):
            raise ValueError(allowed)
        if hi is not None and (value > hi or (below and value == hi)):
            raise ValueError(allowed)
        return value

    return parse


def deadline(raw: str) -> float | str | None:
    """`off` (None), `auto`, or seconds > 0 (ROUND_DEADLINE)."""
    value = raw.strip().lower()
    if value in ("", "off"):
        return None
    if value == "auto":
        return "auto"
    allowed = "off, auto, or a number of seconds > 0"
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(allowed) from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(allowed)
    return seconds


def choice(*options: str) -> Callable[[str], str]:
    """One of `options`, any case."""

    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ValueError("one of " + ", ".join(options))
        return value

    return parse


def boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("true or false")


def url(raw: str) -> str:
    """An http(s) URL with a host, without a trailing slash."""
    parsed = urlparse(raw.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError("an http:// or https:// URL with a host, e.g. http://127.0.0.1:8080")
    return raw.strip().rstrip("/")


def urls(raw: str) -> tuple[str, ...]:
    """Space-separated http(s) URLs, each ending in a slash (a folder to fetch files from)."""
    found = tuple(url(u) + "/" for u in raw.split())
    if not found:
        raise ValueError("one or more http(s) URLs separated by spaces")
    return found


def path(raw: str) -> Path:
    if not raw.strip():
        raise ValueError("a directory path")
    return Path(raw.strip())


def optional_path(raw: str) -> Path | None:
    return Path(raw.strip()) if raw.strip() else None
