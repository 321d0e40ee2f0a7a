"""Write every copy of the settings from the one table, or check that none has drifted.

    python -m fedsim.settings_docs --write    # after adding or changing a setting
    python -m fedsim.settings_docs --check    # exit 1 naming each file that differs

The table is `fedsim.settings_table` (with the rules' rows from their
registry). From it come: the README's table between `<!-- settings:begin -->`
and `<!-- settings:end -->`, `.env.example`, the settings every fedsim service
of compose.yaml receives (`x-settings`, and the `${KEY:-default}` of any other
environment list), and the Kubernetes ConfigMap. Nothing else in those files is
touched.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path

from fedsim.settings import Group, Setting
from fedsim.settings_table import GROUPS, HOST_GROUPS, KNOWN_KEYS

COMMAND = "python -m fedsim.settings_docs --write"
BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"

# compose.yaml fixes these inside the containers, whatever `.env` says for local runs.
COMPOSE_FIXED = {
    "AGGREGATOR_URL": ("http://proxy:8080", "the proxy, the aggregator's front door"),
    "TLS_CA": ("/certs/ca.pem", "the ./certs bind mount"),
    "DATA_DIR": ("/data", "the ./data bind mount"),
    "MODEL_DIR": ("/models", "the models volume"),
    "WORKER_STATE_DIR": ("/state", "the worker-state volume"),
    "TOKENS_FILE": ("/run/secrets/fedsim/tokens.json", "the ./secrets bind mount"),
    "SECAGG_KEY_FILE": (
        "/run/secrets/fedsim-workers/secagg.key",
        "the worker-secrets volume: prepare and client only",
    ),
}
# Not in the ConfigMap: the manifests fix the first five (the Service, the mounts) and
# TF_THREADS (each worker's CPU limit); workers read CLIENT_TOKEN from the tokens Secret.
KUBE_LEFT_OUT = (
    "AGGREGATOR_URL",
    "DATA_DIR",
    "MODEL_DIR",
    "WORKER_STATE_DIR",
    "TOKENS_FILE",
    "TF_THREADS",
    "CLIENT_TOKEN",
)
KUBE_NOTES = {
    "MNIST_MIRRORS": "Tried in order by the init containers; a cluster without internet access"
    " can point this at an in-cluster web server holding the four .gz files.",
    "TLS": "No proxy runs here: the workers speak to the aggregator's Service directly.",
}

ENV_HEADER = f"""\
# fedsim settings. Copy to `.env` and edit: `cp .env.example .env`.
#
# Docker Compose reads this file for compose.yaml and hands each setting to the
# containers; the local runner (scripts/simulate.sh) and the Python commands
# read it from the project folder. Every value below is the code's default, so
# deleting a line (or the whole file) changes nothing. A bad value stops the
# run at once with one line naming the key, the value and what is allowed;
# an unknown key is refused, so a typo cannot pass silently.
#
# Written from services/fedsim/settings_table.py by
# `{COMMAND}`: edit the table, not this file.
"""

KUBE_HEADER = f"""\
# fedsim's settings, handed to every fedsim container with envFrom. Each value is
# the code's default, so deleting a line changes nothing; the README's Settings
# table says what each one does. A bad value stops the container at once with one
# line naming the key (kubectl logs), and the worker Job fails rather than
# retrying it.
#
# Not here, because the manifests fix them: AGGREGATOR_URL (the Service),
# DATA_DIR, MODEL_DIR, WORKER_STATE_DIR and TOKENS_FILE (the mount points), and
# TF_THREADS (each worker's CPU limit; see client-job.yaml). CLIENT_TOKEN is not
# here either: the workers read their token from the tokens Secret.
#
# Settings are read when a container starts: after editing, reset the run (see
# README.md beside this file), since partitions.json and version 0 are made from
# them once. Written from services/fedsim/settings_table.py by
# `{COMMAND}`.
apiVersion: v1
kind: ConfigMap
metadata:
  name: fedsim-settings
  labels:
    app.kubernetes.io/name: fedsim
data:
"""


def _comment(text: str, indent: str = "") -> list[str]:
    width = 79 - len(indent) - 2
    lines = textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)
    return [f"{indent}# {line}" for line in lines]


def _heading(title: str) -> str:
    return f"# --- {title} ".ljust(77, "-")


def _rows(groups: Iterable[Group], keep: Callable[[Setting], bool]) -> Iterable[tuple[str, list]]:
    """(title, rows kept) for each group that keeps any."""
    for group in groups:
        rows = [row for row in group.rows if keep(row)]
        if rows:
            yield group.title, rows


def readme_table() -> str:
    """The README's table: one row per setting, under a bold row per group."""
    lines = ["| setting | default | what it does |", "|---|---|---|"]
    for title, rows in _rows(GROUPS, lambda row: True):
        lines.append(f"| **{title}** | | |")
        for row in rows:
            if " " in row.default:
                shown = "a list, see `.env.example`"  # too long for the table
            else:
                shown = f"`{row.default}`" if row.default else "(empty)"
            why = row.why.replace("|", r"\|")
            lines.append(f"| `{row.key}` | {shown} | {why} |")
    return "\n".join(lines) + "\n"


def env_example() -> str:
    """`.env.example`: every setting, then the keys only Compose and swarm.sh read."""
    out = [ENV_HEADER]
    for group in (*GROUPS, *HOST_GROUPS):
        out.append(_heading(group.title))
        if group.note:
            out += [*_comment(group.note), ""]
        for row in group.rows:
            value = json.dumps(row.default) if " " in row.default else row.default
            out += [*_comment(row.why), f"{row.key}={value}"]
        out.append("")
    return "\n".join(out)


def _plain(value: str) -> str:
    """A YAML scalar for compose.yaml: plain, or quoted where YAML would read it otherwise."""
    risky = value != value.strip() or ": " in value or " #" in value or value[:1] in "\"'&*!|>%@`#"
    return json.dumps(value) if risky else value


def compose_settings() -> str:
    """compose.yaml's `x-settings` mapping: `${KEY:-default}`, then the values fixed inside."""
    out = [
        "x-settings: &settings",
        f"  # Written from services/fedsim/settings_table.py by `{COMMAND}`.",
    ]
    for title, rows in _rows(GROUPS, lambda row: row.key not in COMPOSE_FIXED):
        out.append(f"  # {title}")
        out += [f"  {row.key}: {_plain(f'${{{row.key}:-{row.default}}}')}" for row in rows]
    out += _comment("Fixed inside the containers, not read from .env:", "  ")
    out += [f"  {key}: {value}  # {why}" for key, (value, why) in COMPOSE_FIXED.items()]
    return "\n".join(out) + "\n"


_DEFAULTED = re.compile(r"^(?P<indent> +)(?P<key>[A-Z][A-Z0-9_]*): \$\{(?P=key):-.*\}$", re.M)


def compose(text: str) -> str:
    """compose.yaml with its settings block and every setting's `${KEY:-default}` rewritten."""
    start = text.index("x-settings: &settings\n")
    end = text.index("\n\n", start) + 1
    text = text[:start] + compose_settings() + text[end:]
    defaults = {row.key: row.default for group in GROUPS for row in group.rows}

    def rewrite(match: re.Match) -> str:
        key = match["key"]
        if key not in KNOWN_KEYS:
            return match[0]
        return f"{match['indent']}{key}: {_plain(f'${{{key}:-{defaults[key]}}}')}"

    return _DEFAULTED.sub(rewrite, text)


def configmap() -> str:
    """deploy/kubernetes/configmap.yaml: every setting the manifests leave to users."""
    out = [KUBE_HEADER.rstrip("\n")]
    for title, rows in _rows(GROUPS, lambda row: row.key not in KUBE_LEFT_OUT):
        out.append(f"  # --- {title} ---")
        for row in rows:
            if row.key in KUBE_NOTES:
                out += _comment(KUBE_NOTES[row.key], "  ")
            out.append(f"  {row.key}: {json.dumps(row.default)}")
    return "\n".join(out) + "\n"


def readme(text: str) -> str:
    """README.md with the table between its markers replaced."""
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md lacks the markers {BEGIN} and {END} around its settings table")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{readme_table()}{END}{tail}"


def outputs(root: Path) -> dict[Path, str]:
    """Each generated file under `root` and the text it must hold."""
    return {
        root / "README.md": readme((root / "README.md").read_text()),
        root / ".env.example": env_example(),
        root / "compose.yaml": compose((root / "compose.yaml").read_text()),
        root / "deploy" / "kubernetes" / "configmap.yaml": configmap(),
    }


def drifted(root: Path) -> list[str]:
    """The files whose settings differ from the table, relative to `root`."""
    return [
        str(path.relative_to(root))
        for path, text in outputs(root).items()
        if not path.is_file() or path.read_text() != text
    ]


def _project_root() -> Path:
    here = Path(__file__).resolve().parents[2]  # services/fedsim/settings_docs.py
    return here if (here / "compose.yaml").is_file() else Path.cwd()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedsim.settings_docs", description=__doc__)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--write", action="store_true", help="rewrite the files from the table")
    what.add_argument("--check", action="store_true", help="exit 1 if any file differs")
    parser.add_argument("--root", type=Path, default=None, help="the project folder")
    args = parser.parse_args(argv)
    root = args.root or _project_root()
    stale = drifted(root)
    if args.check:
        if stale:
            print(
                f"settings drifted from the table in: {', '.join(stale)}; run `{COMMAND}`",
                file=sys.stderr,
            )
            return 1
        print("settings: README.md, .env.example, compose.yaml and the ConfigMap match the table")
        return 0
    for path, text in outputs(root).items():
        if str(path.relative_to(root)) in stale:
            path.write_text(text)
            print(f"wrote {path.relative_to(root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
