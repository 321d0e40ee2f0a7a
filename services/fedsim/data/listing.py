"""The JSON files `prepare` writes beside the checkpoints, one line per logical client
(partitions.json, clients.json): written atomically, read with one-line errors.

Each file's own module checks what it holds; this one only writes and reads it, so the
two files say the same thing when one is missing, unreadable or not JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def dumps(content: dict[str, Any]) -> str:
    """JSON with one line per client (`content["clients"]`), so the file reads and diffs
    well; NaN and infinity are refused (ValueError), as JSON has none."""
    head = json.dumps({k: v for k, v in content.items() if k != "clients"}, allow_nan=False)
    lines = ",\n".join("  " + json.dumps(c, allow_nan=False) for c in content["clients"])
    return head[:-1] + ', "clients": [\n' + lines + "\n]}\n"


def write(model_dir: Path, name: str, content: dict[str, Any]) -> Path:
    """MODEL_DIR/`name`, written atomically; returns the path."""
    from fedsim.checkpoints import write_atomic

    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / name
    write_atomic(path, dumps(content).encode())
    return path


def read(model_dir: Path, name: str, error: type[Exception]) -> Any:
    """The JSON in MODEL_DIR/`name`; `error` (one line naming the file and the fault)
    when it is missing, unreadable or not JSON."""
    path = model_dir / name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(
            f"no {name} in {model_dir}: run python -m fedsim.prepare "
            "(or docker compose up, which runs the prepare service) first"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot be read ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not JSON ({exc})") from None
