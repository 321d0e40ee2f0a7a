"""The files written from the settings table hold what the table says, and drift is caught.

`python -m fedsim.settings_docs --write` writes the README's settings block,
`.env.example`, compose.yaml's settings and the Kubernetes ConfigMap; each test
here fails when one of them was edited by hand or a setting changed without
running it. test_env_example.py and test_kubernetes.py check the same files
against the running code (load, defaults, manifests) independently of the
generator.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from dotenv import dotenv_values

from fedsim import settings_docs, settings_table
from fedsim.aggregator import strategies

ROOT = Path(__file__).resolve().parent.parent
FILES = ("README.md", ".env.example", "compose.yaml", "deploy/kubernetes/configmap.yaml")


@pytest.mark.parametrize("name", FILES)
def test_generated_file_matches_the_table(name: str) -> None:
    expected = settings_docs.outputs(ROOT)[ROOT / name]
    assert (ROOT / name).read_text() == expected, (
        f"{name} drifted from services/fedsim/settings_table.py: run "
        "`python -m fedsim.settings_docs --write`"
    )


def test_check_passes_on_the_project() -> None:
    assert settings_docs.main(["--check", "--root", str(ROOT)]) == 0


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    for name in FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


@pytest.mark.parametrize(
    ("name", "old", "new"),
    [
        ("README.md", "| `SEED` | `42` |", "| `SEED` | `7` |"),
        (".env.example", "\nEPOCHS=5\n", "\nEPOCHS=6\n"),
        (".env.example", "\nKRUM_M=1\n", "\n"),
        ("compose.yaml", "${MAX_RETRY:-2}", "${MAX_RETRY:-3}"),
        # The proxy's own list, outside x-settings.
        (
            "compose.yaml",
            "MAX_UPDATE_BYTES: ${MAX_UPDATE_BYTES:-16777216}\n    volumes",
            "MAX_UPDATE_BYTES: ${MAX_UPDATE_BYTES:-1024}\n    volumes",
        ),
        ("deploy/kubernetes/configmap.yaml", 'MODEL: "mlp"', 'MODEL: "cnn"'),
    ],
)
def test_check_names_the_file_that_drifted(copy: Path, capsys, name, old, new) -> None:
    path = copy / name
    text = path.read_text()
    assert old in text, f"{name} no longer holds {old!r}"
    path.write_text(text.replace(old, new, 1))
    assert settings_docs.main(["--check", "--root", str(copy)]) == 1
    err = capsys.readouterr().err
    assert name in err and "python -m fedsim.settings_docs --write" in err
    assert [f for f in FILES if f in err] == [name]
    assert settings_docs.main(["--write", "--root", str(copy)]) == 0
    assert path.read_text() == text, "--write restores what the table says"


def test_write_keeps_everything_outside_the_settings(copy: Path) -> None:
    readme, compose = copy / "README.md", copy / "compose.yaml"
    readme.write_text(readme.read_text() + "\nA line of prose.\n")
    compose.write_text(compose.read_text().replace("restart: unless-stopped", "restart: always"))
    settings_docs.main(["--write", "--root", str(copy)])
    assert readme.read_text().endswith("\nA line of prose.\n")
    assert "restart: always" in compose.read_text()


def test_readme_without_markers_is_refused(copy: Path) -> None:
    readme = copy / "README.md"
    readme.write_text(readme.read_text().replace(settings_docs.BEGIN, ""))
    with pytest.raises(SystemExit, match="settings:begin"):
        settings_docs.main(["--check", "--root", str(copy)])


def test_env_example_lists_every_row_with_its_description_in_groups() -> None:
    text = (ROOT / ".env.example").read_text()
    values = dotenv_values(ROOT / ".env.example")
    groups = (*settings_table.GROUPS, *settings_table.HOST_GROUPS)
    for group in groups:
        assert f"# --- {group.title} " in text, group.title
        for row in group.rows:
            assert values[row.key] == row.default, row.key
            # The description's words, in order, in the comment right above the key.
            comment = text.split(f"\n{row.key}=", 1)[0].rsplit("\n\n", 1)[-1]
            assert " ".join(row.why.split()) in " ".join(comment.replace("# ", "").split())
    assert list(values) == [row.key for group in groups for row in group.rows]


def test_compose_settings_are_valid_yaml_in_table_order() -> None:
    settings = yaml.safe_load((ROOT / "compose.yaml").read_text())["x-settings"]
    fixed = list(settings_docs.COMPOSE_FIXED)
    table = [s.key for s in settings_table.SETTINGS if s.key not in fixed]
    assert list(settings) == table + fixed


def test_rule_rows_are_in_every_output() -> None:
    # A rule's row reaches all four files through its registry entry alone.
    outputs = settings_docs.outputs(ROOT)
    for row in strategies.rule_settings():
        for path, text in outputs.items():
            assert row.key in text, f"{row.key} missing from {path.name}"
