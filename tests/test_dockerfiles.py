"""The Dockerfiles, read as text: what every image build must do, checked without Docker."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = sorted(
    p for p in ROOT.rglob("Dockerfile") if not {".venv", "node_modules"} & set(p.parts)
)


def instructions(path: Path) -> list[str]:
    """The file's instructions, each on one line (continuations joined, comments dropped)."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    return [i.strip() for i in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines() if i.strip()]


def test_the_images_dockerfiles_are_found():
    names = {str(p.relative_to(ROOT)) for p in DOCKERFILES}
    assert {"services/aggregator/Dockerfile", "services/client/Dockerfile"} <= names


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_apt_install_drops_apts_lists_and_caches_in_its_own_layer(path):
    # Left in a layer, apt's lists and its pkgcache.bin/srcpkgcache.bin weigh about 80 MB
    # (base images without Debian's docker-clean setting write them on every install).
    installs = [i for i in instructions(path) if i.startswith("RUN") and "apt-get install" in i]
    for run in installs:
        assert "rm -rf /var/lib/apt/lists/*" in run, f"{path.name}: {run[:80]}..."
        assert "/var/cache/apt/*.bin" in run, f"{path.name}: {run[:80]}..."


def test_the_aggregators_allocator_is_installed_before_its_dependencies_and_code():
    # A code change rebuilds the layers after COPY services/fedsim: apt must not be among them.
    steps = instructions(ROOT / "services" / "aggregator" / "Dockerfile")
    jemalloc = next(n for n, i in enumerate(steps) if "libjemalloc2" in i)
    code = next(n for n, i in enumerate(steps) if i.startswith("COPY services/fedsim"))
    requirements = next(n for n, i in enumerate(steps) if "requirements.txt" in i)
    assert jemalloc < requirements < code
