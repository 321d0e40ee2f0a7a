"""The README's settings table stays in step with the code."""

from __future__ import annotations

import re
from pathlib import Path

from fedsim import config

ROOT = Path(__file__).resolve().parent.parent


def settings_table() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \| (.*?) \|", text, flags=re.M)
    return dict(rows)


def test_every_setting_is_in_the_readme_with_its_default() -> None:
    table = settings_table()
    assert set(table) == config.KNOWN_KEYS
    for setting in config.SETTINGS:
        if setting.key == "MNIST_MIRRORS":
            continue  # too long for the table; the row points to .env.example
        shown = table[setting.key]
        assert shown == (f"`{setting.default}`" if setting.default else "(empty)"), setting.key
