"""The journal: an append-only, fsynced file of what changed the state since the last checkpoint.

Under DURABLE=true an update is acknowledged only once it is on disk: in a
checkpoint, or here. Each record has a sequence number (1, 2, ... across the
run, never reused) and is one of

- `update`: an update the rule took, with its tensors and everything the rule
  and the ledger read of it (asynchronous rules: one record per step of the
  rule; round rules: one per update put into the open round);
- `close`: a round closed before it was full (on time), which a replay cannot
  tell from the updates alone.

A record is marked `step` when the state after it holds everything before it
(every asynchronous update; a round's close): a checkpoint taken then covers
the journal up to it, and saves that number (`journal_seq` in its metadata).
The open round's updates are not steps: a checkpoint does not hold them, so
they stay in the journal until their round closes and a checkpoint follows.

**Group commit.** `append` (under the state's lock) only queues a record;
`commit` makes it durable. The first caller to find no write running takes
every queued record, writes them in one write and fsyncs once; the callers
that arrive meanwhile wait on a condition, and all whose records that write
held are released by its one fsync. So N concurrent updates cost one fsync,
not N.

**The file** `MODEL_DIR/journal.bin`, mode 0600, is a sequence of records:
magic `FSJ1`, the payload's length (8 bytes, little-endian), its CRC-32 (4
bytes), and the payload, safetensors bytes whose metadata holds the record's
JSON. A torn or corrupt tail (a kill mid-write, a bad sector) ends the
journal: it is logged, cut off, and start-up goes on with the records before
it (none of which was ever acknowledged past it). `truncate` drops the records
a checkpoint covers by writing the rest to a new file and renaming it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedsim import weights

log = logging.getLogger("fedsim.aggregator")

FILE = "journal.bin"
MAGIC = b"FSJ1"
_HEAD = struct.Struct("<4sQI")  # magic, payload length, CRC-32 of the payload
MAX_PAYLOAD = 1 << 30  # a length beyond this is a corrupt header, not a record
_META_KEY = "record"
_MAX_META = 1 << 20  # the record's JSON (update metadata) in the payload's header


@dataclass(frozen=True)
class Record:
    """One journal entry: `kind` "update" or "close", its fields and tensors."""

    seq: int
    kind: str
    step: bool
    fields: dict[str, Any]
    tensors: Mapping[str, np.ndarray] = field(default_factory=dict)


def encode(record: Record) -> bytes:
    """The record as it is written: header and payload."""
    body = {"seq": record.seq, "kind": record.kind, "step": record.step, **record.fields}
    payload = weights.encode(record.tensors, {_META_KEY: json.dumps(body)})
    return _HEAD.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def _decode(payload: bytes) -> Record:
    tensors, meta = weights.decode(payload, max_value=_MAX_META)
    body = json.loads(meta[_META_KEY])
    seq, kind, step = body.pop("seq"), body.pop("kind"), body.pop("step")
    if not isinstance(seq, int) or kind not in ("update", "close") or not isinstance(step, bool):
        raise ValueError(f"bad record header: seq={seq!r} kind={kind!r}")
    return Record(seq, kind, step, body, tensors)


def read(path: Path) -> tuple[list[tuple[int, Record]], int]:
    """The records of the journal at `path` with their byte offsets, and the length of the
    good part. A torn or corrupt tail is logged and left out (never raised)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    out: list[tuple[int, Record]] = []
    offset, last = 0, 0
    while offset < len(data):
        why = None
        if len(data) - offset < _HEAD.size:
            why = "a torn record header"
        else:
            magic, size, crc = _HEAD.unpack_from(data, offset)
            start, end = offset + _HEAD.size, offset + _HEAD.size + size
            if magic != MAGIC or size > MAX_PAYLOAD:
                why = "a corrupt record header"
            elif end > len(data):
                why = "a torn record"
            elif zlib.crc32(data[start:end]) != crc:
                why = "a record with a bad checksum"
            else:
                try:
                    record = _decode(data[start:end])
                except (ValueError, KeyError, TypeError, RecursionError) as exc:
                    why = f"an unreadable record ({exc})"
                else:
                    if record.seq <= last:
                        why = f"record {record.seq} out of order after {last}"
        if why is not None:
            log.warning(
                "journal %s: %s at byte %d; the %d bytes from there are skipped "
                "(%d records before it are kept)",
                path,
                why,
                offset,
                len(data) - offset,
                len(out),
            )
            break
        out.append((offset, record))
        last = record.seq
        offset = end
    return out, offset


def _write_all(fd: int, data: bytes) -> None:
    view, done = memoryview(data), 0
    while done < len(data):
        done += os.write(fd, view[done:])


def _fsync_dir(folder: Path, fsync: Callable[[int], None]) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """The journal file of one aggregator: append, group commit, truncate. Thread-safe."""

    def __init__(
        self, path: Path, *, last_seq: int = 0, fsync: Callable[[int], None] = os.fsync
    ) -> None:
        """Open (or create, mode 0600) the journal at `path`; cut off a bad tail. Records are
        numbered after `last_seq` and after the file's own (see `records`)."""
        self.path, self._fsync = path, fsync
        found, good = read(path)
        self.records = [r for _, r in found]  # what the file held at start, for the replay
        self._offsets = [(r.seq, offset) for offset, r in found]
        created = not path.exists()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if os.fstat(self._fd).st_size != good:
            os.ftruncate(self._fd, good)
            fsync(self._fd)
        if created:
            _fsync_dir(path.parent, fsync)
        self._size = good
        self.last = max([last_seq, *(r.seq for r in self.records)])  # the last appended
        self.step = last_seq  # the last step appended (what a checkpoint now covers)
        self._synced = self.last
        self._pending: list[Record] = []
        self._writing = False
        self._cond = threading.Condition()

    def append(
        self,
        kind: str,
        fields: Mapping[str, Any],
        tensors: Mapping[str, np.ndarray] | None = None,
        *,
        step: bool,
    ) -> int:
        """Queue a record (written by the next `commit`); its number. Calls must come in the
        order the state took the changes (the caller holds the state's lock)."""
        with self._cond:
            self.last += 1
            self._pending.append(Record(self.last, kind, step, dict(fields), tensors or {}))
            if step:
                self.step = self.last
            return self.last

    def commit(self, seq: int | None = None) -> None:
        """Return once record `seq` (default: every record appended so far) is fsynced.

        Group commit: one caller writes and fsyncs every queued record while the
        others wait, and that fsync releases them all. Raises what the write raised
        (OSError when the disk fails): its records stay queued for the next commit."""
        with self._cond:
            target = self.last if seq is None else seq
            if target > self.last:
                raise ValueError(f"journal: record {target} was never appended (last {self.last})")
            while self._synced < target:
                if self._writing:
                    self._cond.wait()
                else:
                    self._lead()

    def _lead(self) -> None:
        """Write and fsync every queued record. Caller holds _cond; released during the I/O.

        Every record after `_synced` is queued or in the batch being written (a
        failed batch goes back to the queue), so an empty queue here is a bug: it
        raises rather than call records written that never were."""
        batch, self._pending = self._pending, []
        if not batch:
            raise RuntimeError(
                f"journal: records {self._synced + 1}..{self.last} are neither queued nor written"
            )
        self._writing, error = True, None
        self._cond.release()
        try:
            if os.fstat(self._fd).st_size != self._size:  # a failed write left bytes behind
                os.ftruncate(self._fd, self._size)
            blobs = [encode(r) for r in batch]
            _write_all(self._fd, b"".join(blobs))
            self._fsync(self._fd)
        except BaseException as exc:
            error = exc
        finally:
            self._cond.acquire()
            self._writing = False
            self._cond.notify_all()
        if error is not None:
            self._pending = batch + self._pending
            with contextlib.suppress(OSError):  # else the next write cuts them off first
                os.ftruncate(self._fd, self._size)  # drop a partial write
            raise error
        for record, blob in zip(batch, blobs, strict=True):
            self._offsets.append((record.seq, self._size))
            self._size += len(blob)
        self._synced = batch[-1].seq

    def truncate(self, covered: int) -> None:
        """Drop the records up to `covered` (a checkpoint holds them): the rest goes to a new
        file, fsynced and renamed over the old one. Raises OSError (the file is unchanged)."""
        with self._cond:
            while self._writing:
                self._cond.wait()
            keep = next((off for seq, off in self._offsets if seq > covered), self._size)
            if keep == 0:
                return
            self._writing = True  # no commit writes meanwhile; appends only queue
        try:
            with open(self.path, "rb") as old:
                old.seek(keep)
                rest = old.read(self._size - keep)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, rest)
                self._fsync(fd)
            finally:
                os.close(fd)
            fd = os.open(tmp, os.O_WRONLY | os.O_APPEND)
            try:
                os.replace(tmp, self.path)
            except OSError:
                os.close(fd)
                raise
            os.close(self._fd)
            self._fd = fd  # from here on, commits write to the new file
            self._offsets = [(seq, off - keep) for seq, off in self._offsets if seq > covered]
            self._size = len(rest)
            _fsync_dir(self.path.parent, self._fsync)
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()

    @property
    def empty(self) -> bool:
        """Nothing in the file and nothing queued."""
        with self._cond:
            return self._size == 0 and not self._pending and not self._writing

    def close(self) -> None:
        with self._cond:
            os.close(self._fd)
