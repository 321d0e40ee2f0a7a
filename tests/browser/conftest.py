"""Browser tests: the marker is registered here too, so that they run wherever this folder is."""

from __future__ import annotations


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers",
        "browser: the dashboard in headless Chromium (Debian's chromium, chromium-driver)",
    )
