"""Experiment files written for a test, their one-line refusals, and a progress line kept in
memory (imported on its own: `from helpers.experiments import ...`)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from fedsim.experiment import progress, spec


def write(tmp_path: Path, text: str, name: str = "trial.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def refused(tmp_path: Path, text: str) -> str:
    """The one-line error of trial.toml holding `text`; it names the file first."""
    with pytest.raises(spec.ExperimentError) as caught:
        spec.load(write(tmp_path, text))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "trial.toml") + ": ")
    return message


class Recorder(progress.Progress):
    """The progress line, kept in memory; `interrupt_at`: Ctrl-C at that run's first round."""

    def __init__(self, runs: int, rounds: float, interrupt_at: int = 0) -> None:
        super().__init__(runs, rounds, out=io.StringIO(), tty=False)
        self.interrupt_at = interrupt_at
        self.begun: list[str] = []
        self.skipped = 0

    def skip(self, rounds: float) -> None:
        super().skip(rounds)
        self.skipped += 1

    def begin(self, label: str, rounds: float) -> None:
        super().begin(label, rounds)
        self.begun.append(label)

    def entry(self, x: float) -> None:
        super().entry(x)
        if self.number == self.interrupt_at and x >= 1:
            raise KeyboardInterrupt
