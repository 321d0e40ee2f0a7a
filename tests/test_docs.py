"""The README and docs/ stay true: links, file names, the structure map, the settings table.

Every relative link must reach a file (and a heading, when it names one); every
repository path or module named in backticks must exist; the README's structure
map must name only what is there; the README's settings table must hold every
setting with its default; the README stays short, and a measured figure lives in
one page only.
"""

from __future__ import annotations

import re
import unicodedata
from functools import cache
from pathlib import Path

import pytest

from fedsim import settings_table

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 320
BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"

# Where a short path in backticks (`tasks/ids.py`, `client/outbox.py`) may live.
BASES = (
    ROOT,
    ROOT / "services" / "fedsim",
    ROOT / "services" / "fedsim" / "aggregator",
)
TOP = ("services/", "scripts/", "deploy/", "docs/", "tests/", "data/", ".ci/")
ROOT_FILES = {"compose.yaml", ".env.example", "pyproject.toml", "requirements-dev.txt"}
SOURCE = re.compile(r"^[\w.-]+\.(py|sh|yaml|yml|md|toml|txt|template)$")
SKIP_DIRS = {".git", ".venv", ".hypothesis", ".ruff_cache", "__pycache__", "node_modules"}


def text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def prose(page: Path) -> str:
    """The page without the generated settings block, whose content is not written here."""
    body = text(page)
    if BEGIN in body:
        head, rest = body.split(BEGIN, 1)
        body = head + rest.split(END, 1)[1]
    return body


def rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


# --- links ----------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"[`*_]", "", heading.strip()).lower()
    kept = "".join(
        c for c in heading if c in " -" or unicodedata.category(c)[0] in "LNM" or c == "_"
    )
    return kept.replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in text(page).splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^#{1,6}\s+(.*)$", line)):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def links(page: Path) -> list[str]:
    body = re.sub(r"^```.*?^```", "", text(page), flags=re.M | re.S)
    return re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", body)


LINKS = [
    pytest.param(page, target, id=f"{rel(page)}->{target}")
    for page in PAGES
    for target in links(page)
    if not re.match(r"^[a-z]+:", target)  # http:, https:, mailto:
]


@pytest.mark.parametrize(("page", "target"), LINKS)
def test_every_relative_link_reaches_a_file_and_its_heading(page: Path, target: str) -> None:
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    assert dest.exists(), f"{rel(page)} links to {target}, which does not exist"
    if anchor and dest.suffix == ".md":
        assert anchor in anchors(dest), f"{rel(page)} links to #{anchor}, no such heading"


# --- file and module names in backticks -----------------------------------------------


def spans(page: Path) -> list[str]:
    """Inline code and fenced blocks, split into words."""
    body = prose(page)
    words: list[str] = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", body, flags=re.M | re.S):
        words += block.split()
    body = re.sub(r"^```.*?^```", "", body, flags=re.M | re.S)
    for span in re.findall(r"`([^`\n]+)`", body):
        words += span.split()
    return [w.strip("'\",;:()[]") for w in words]


@cache
def repo_names() -> frozenset[str]:
    """The name of every file in the repository (for a bare `state.py`)."""
    names = set()
    for path in ROOT.rglob("*"):
        if path.is_file() and not SKIP_DIRS.intersection(path.relative_to(ROOT).parts):
            names.add(path.name)
    return frozenset(names)


def exists(path: str) -> bool:
    """A path relative to the repository or to the package, with `*` as a glob."""
    path = path.rstrip("/")
    for base in BASES:
        found = list(base.glob(path)) if "*" in path else [base / path]
        if any(p.exists() for p in found):
            return True
    return False


def module_exists(dotted: str) -> bool:
    parts = dotted.split(":")[0].split(".")
    path = ROOT / "services" / Path(*parts)
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def mentions(page: Path) -> list[tuple[str, str]]:
    """(kind, name) of every repository path, file name and fedsim module the page names."""
    out = []
    for word in spans(page):
        if "<" in word or "..." in word or "…" in word or word.startswith(("/", "./", "http")):
            continue
        if word.startswith(TOP) or word in ROOT_FILES:
            out.append(("path", word))
        elif "/" in word and SOURCE.match(word.rsplit("/", 1)[1]):
            out.append(("path", word))  # short: tasks/ids.py, client/outbox.py
        elif SOURCE.match(word) and not word.startswith("fedsim."):
            out.append(("name", word))
        elif re.fullmatch(r"fedsim(\.[a-z_]+)+(:\w+(\(\))?)?", word):
            out.append(("module", word))
    return sorted(set(out))


MENTIONS = [
    pytest.param(page, kind, name, id=f"{rel(page)}:{name}")
    for page in PAGES
    for kind, name in mentions(page)
]


@pytest.mark.parametrize(("page", "kind", "name"), MENTIONS)
def test_every_file_and_module_named_exists(page: Path, kind: str, name: str) -> None:
    if kind == "path":
        ok = exists(name)
    elif kind == "name":
        ok = name in repo_names()
    else:
        ok = module_exists(name)
    assert ok, f"{rel(page)} names `{name}`, which is not in the repository"


# --- the structure map ----------------------------------------------------------------


def structure_map() -> list[tuple[int, str, str]]:
    """(indent, name, description) of each entry of the README's structure map."""
    body = text(README).split("## Where things are", 1)[1]
    block = re.search(r"^```\n(.*?)^```", body, flags=re.M | re.S)
    assert block, "the README's structure map is a fenced block under 'Where things are'"
    entries: list[tuple[int, str, str]] = []
    for line in block.group(1).splitlines():
        m = re.match(r"^( *)(\S+)(?:\s{2,}(.*))?$", line)
        if m and len(m.group(1)) < 12:
            entries.append((len(m.group(1)), m.group(2), m.group(3) or ""))
        elif entries:  # a description carried over to the next line
            indent, name, desc = entries[-1]
            entries[-1] = (indent, name, f"{desc} {line.strip()}")
    return entries


def map_paths() -> list[str]:
    """Every path the map names: its entries, and the files and folders in their descriptions."""
    stack: list[tuple[int, str]] = []
    out = []
    for indent, name, desc in structure_map():
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else ""
        path = parent + name
        out.append(path)
        if name.endswith("/"):
            stack.append((indent, path))
        here = path if name.endswith("/") else parent
        for word in re.findall(r"[\w*<>.-]+\.(?:py|sh|yaml|yml|md|txt)\b|Dockerfile", desc):
            out.append(here + word)
        for word in re.findall(r"(?<![\w/])([\w-]+/)(?=[\s,):]|$)", desc):
            out.append(here + word)
    return out


@pytest.mark.parametrize("path", map_paths())
def test_the_structure_map_names_only_what_is_there(path: str) -> None:
    if "<" in path:
        pattern = re.sub(r"<[^>]+>", "*", path)
        assert list(ROOT.glob(pattern)), f"the structure map names {path}: nothing matches"
        return
    found = list(ROOT.glob(path.rstrip("/"))) if "*" in path else [ROOT / path]
    assert any(p.exists() for p in found), f"the structure map names {path}, which is not there"


def test_the_structure_map_shows_every_folder_of_the_package() -> None:
    named = {p.rstrip("/") for p in map_paths()}
    package = ROOT / "services" / "fedsim"
    for folder in sorted(package.rglob("__init__.py")):
        where = str(folder.parent.relative_to(ROOT))
        if folder.parent != package:
            assert where in named, f"the structure map does not show {where}/"


def test_the_structure_map_is_near_the_top() -> None:
    headings = [line for line in text(README).splitlines() if line.startswith("## ")]
    assert "## Where things are" in headings[:2], headings


# --- the README as a front door -------------------------------------------------------


def test_the_readme_fits_on_a_few_screens() -> None:
    lines = len(text(README).splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines, at most {MAX_README_LINES}"


@pytest.mark.parametrize(
    "command",
    [
        "cp .env.example .env",
        "docker compose up --build --scale client=3",
        "scripts/evaluate.sh",
        "scripts/test.sh",
        "docker compose --profile '*' down -v --remove-orphans",
    ],
)
def test_the_readme_gives_the_commands(command: str) -> None:
    assert command in text(README)


def test_the_readme_shows_the_dashboard_and_points_to_every_page() -> None:
    targets = {t.partition("#")[0] for t in links(README)}
    assert "docs/dashboard.png" in targets
    for page in PAGES[1:]:
        assert rel(page) in targets, f"the README does not link {rel(page)}"


# --- the settings table ---------------------------------------------------------------


def readme_settings() -> dict[str, str]:
    body = text(README)
    assert body.count(BEGIN) == 1 and body.count(END) == 1, "one settings block in the README"
    block = body.split(BEGIN, 1)[1].split(END, 1)[0]
    rows = re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \| (.*?) \|", block, flags=re.M)
    return dict(rows)


def test_every_setting_is_in_the_readme_with_its_default() -> None:
    table = readme_settings()
    assert set(table) == settings_table.KNOWN_KEYS
    for setting in settings_table.SETTINGS:
        if setting.key == "MNIST_MIRRORS":
            continue  # too long for the table; the row points to .env.example
        shown = table[setting.key]
        assert shown == (f"`{setting.default}`" if setting.default else "(empty)"), setting.key


# --- measured figures -----------------------------------------------------------------

FIGURE = re.compile(r"\b\d+\.\d+ ?(?:%|ms|s|MB|GB|MiB|kB)(?!\w)")
# A mean with its spread over seeds is one figure: "97.26% ± 0.05%".
SPREAD = re.compile(FIGURE.pattern + r" ± " + FIGURE.pattern[2:])


def figures(body: str) -> set[str]:
    """The measured figures a page states: means with their spreads, then lone figures."""
    pairs = set(SPREAD.findall(body))
    return pairs | set(FIGURE.findall(SPREAD.sub(" ", body)))


def test_a_figure_with_its_spread_counts_once() -> None:
    assert figures("97.26% ± 0.05% and 1.5 s, 96.94% ± 0.13%") == {
        "97.26% ± 0.05%", "1.5 s", "96.94% ± 0.13%",
    }  # fmt: skip


def test_a_measured_figure_is_stated_in_one_page_only() -> None:
    where: dict[str, set[str]] = {}
    for page in PAGES:
        for figure in figures(prose(page)):
            where.setdefault(figure.replace(" ", ""), set()).add(rel(page))
    twice = {figure: sorted(pages) for figure, pages in where.items() if len(pages) > 1}
    assert not twice, f"figures stated in more than one page: {twice}"
