"""The names of work: logical clients, task ids, and the seeds drawn from them.

Task ids are deterministic, so an id names the same piece of work after a
restart, and an update is counted once however often it is pushed. Numbers are
ASCII without leading zeros, so each task has one spelling:

- `c2.s5`: PARTITION=slices under an asynchronous rule: client 2 trains its slice 5.
- `u42.c17`: other partitions under an asynchronous rule: update 42 of the run, by client 17.
- `r3.c17`: round rules: client 17's update in round 3;
  `r3a2.c17` in its second attempt (a round retried at its deadline, rounds.py).
- `eval.v12`: score version 12 on the test set.

Seeds: round r's sample is drawn with a generator seeded by (SEED, r), its
attempt a >= 2 by (SEED, r, a), the
attackers by SEED alone, and a task trains with a seed hashed from (SEED, its
id), so the same seed gives the same experiment whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedsim.protocol import client_id

_N = r"(0|[1-9][0-9]*)"  # ASCII, no leading zeros: one spelling per task id
_ATTEMPT = r"(?:a([2-9]|[1-9][0-9]+))?"  # a round's attempt, spelt only from 2 on
_TASK = re.compile(rf"^(?:c{_N}\.s{_N}|u{_N}\.c{_N}|r{_N}{_ATTEMPT}\.c{_N}|eval\.v{_N})$")
# The regex groups of each kind's numbers (a round's: round, attempt, client; an evaluation's
# one).
_SLICE, _UPDATE, _ROUND, _EVAL = 1, 3, 5, 8


@dataclass(frozen=True)
class Client:
    """A logical client as the manifest (partitions.json) describes it."""

    number: int  # 1-based: client-<number>
    samples: int
    sha256: str
    slices: tuple[int, int] | None = None  # PARTITION=slices: its inclusive range

    @property
    def id(self) -> str:
        return client_id(self.number)

    @property
    def slice_numbers(self) -> range:
        assert self.slices is not None
        return range(self.slices[0], self.slices[1] + 1)

    @property
    def range_text(self) -> str:
        """'5-8': its slices, as tasks and log lines show them."""
        assert self.slices is not None
        return f"{self.slices[0]}-{self.slices[1]}"


def slice_task(client: int, slice_no: int) -> str:
    return f"c{client}.s{slice_no}"


def update_task(n: int, client: int) -> str:
    return f"u{n}.c{client}"


def round_task(round_no: int, client: int, attempt: int = 1) -> str:
    return f"r{round_no}.c{client}" if attempt == 1 else f"r{round_no}a{attempt}.c{client}"


def eval_task(version: int) -> str:
    return f"eval.v{version}"


def is_task(task_id: str) -> bool:
    """Whether `task_id` is spelt as a task id of any kind."""
    return _TASK.fullmatch(task_id) is not None


def _pair(task_id: str, group: int) -> tuple[int, int] | None:
    match = _TASK.fullmatch(task_id)
    if match is None or match.group(group) is None:
        return None
    return int(match.group(group)), int(match.group(group + 1))


def parse_slice(task_id: str) -> tuple[int, int] | None:
    """(client, slice) of `c<client>.s<slice>`, else None."""
    return _pair(task_id, _SLICE)


def parse_update(task_id: str) -> tuple[int, int] | None:
    """(update number, client) of `u<n>.c<client>`, else None."""
    return _pair(task_id, _UPDATE)


def parse_round(task_id: str) -> tuple[int, int] | None:
    """(round, client) of `r<round>.c<client>` or `r<round>a<attempt>.c<client>`, else None."""
    parsed = parse_attempt(task_id)
    return None if parsed is None else (parsed[0], parsed[2])


def parse_attempt(task_id: str) -> tuple[int, int, int] | None:
    """(round, attempt, client) of a round's task id (attempt 1 when not spelt), else None."""
    match = _TASK.fullmatch(task_id)
    if match is None or match.group(_ROUND) is None:
        return None
    attempt = match.group(_ROUND + 1)
    return int(match.group(_ROUND)), int(attempt or 1), int(match.group(_ROUND + 2))


def parse_eval(task_id: str) -> int | None:
    """The version of `eval.v<version>`, else None."""
    match = _TASK.fullmatch(task_id)
    return None if match is None or match.group(_EVAL) is None else int(match.group(_EVAL))


def sample(
    seed: int,
    round_no: int,
    k: int,
    n: int,
    attempt: int = 1,
    online: Sequence[int] | None = None,
) -> list[int]:
    """Round `round_no`'s k distinct clients of n (1-based, ascending), seeded by (seed, round),
    or (seed, round, attempt) from the second attempt on. `online`: the clients it may draw
    from (the others are away), all when None; fewer than k online gives them all. With all
    online, the draw is the one of `rng.choice(n)`, so availability changes nothing then."""
    rng = np.random.default_rng([seed, round_no] if attempt == 1 else [seed, round_no, attempt])
    pool = np.arange(n) if online is None else np.asarray(sorted(online), dtype=np.int64) - 1
    k = min(k, len(pool))
    return sorted(int(i) + 1 for i in rng.choice(pool, size=k, replace=False))


def choose_attackers(seed: int, k: int, n: int) -> list[int]:
    """The k attacking clients out of n (1-based, ascending), seeded by SEED alone."""
    if k == 0:
        return []
    rng = np.random.default_rng([seed, 0xA77AC])
    return sorted(int(i) + 1 for i in rng.choice(n, size=k, replace=False))


def task_seed(seed: int, task_id: str) -> int:
    """The seed a worker trains a task with: the same for a task whichever worker takes it.

    The first 31 bits of SHA-256("<seed>:<task id>")."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{task_id}".encode()).digest()[:4], "big") >> 1


def ranges(numbers: Sequence[int]) -> str:
    """1 2 3 5 -> '1-3,5': a compact, header-friendly form of a set of task numbers."""
    out, numbers = [], sorted(numbers)
    i = 0
    while i < len(numbers):
        j = i
        while j + 1 < len(numbers) and numbers[j + 1] == numbers[j] + 1:
            j += 1
        out.append(str(numbers[i]) if i == j else f"{numbers[i]}-{numbers[j]}")
        i = j + 1
    return ",".join(out)


def unranges(text: str, limit: int) -> set[int]:
    """The numbers of `ranges(...)` up to `limit` (a range past it is clamped first)."""
    out: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), min(int(hi or lo), limit) + 1))
    return out
