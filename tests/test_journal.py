"""DURABLE=true: the journal's file (group commit, a torn or corrupt tail, truncation), the
replay that puts every acknowledged update back into the resumed state once, and a real
gunicorn killed with SIGKILL under eight concurrent uploaders."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from fedsim import checkpoints, weights
from fedsim.aggregator import journal
from fedsim.aggregator.journal import Journal
from helpers import (
    ROUNDS,
    WORKERS_TOKEN,
    Server,
    answer,
    ask,
    lookup,
    model_dir,
    post,
    prepared,
    served,
    start_gunicorn,
    state_of,
    upload,
    wait_healthy,
    wait_until,
)

# --- the file: group commit, failures, a torn tail, truncation ------------------------


class CountingFsync:
    """os.fsync that counts its calls, and fails the next `fail` of them."""

    def __init__(self) -> None:
        self.calls, self.fail = 0, 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.fail:
            self.fail -= 1
            raise OSError(28, "No space left on device")
        os.fsync(fd)


def _tensor(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((3, 2), value, dtype=np.float32)}


def _append(jr: Journal, n: int) -> int:
    return jr.append("update", {"update_id": f"u{n}"}, _tensor(float(n)), step=True)


def test_concurrent_commits_share_one_write_and_one_fsync(tmp_path: Path) -> None:
    fsync = CountingFsync()
    jr = Journal(tmp_path / journal.FILE, fsync=fsync)
    fsync.calls = 0  # creating the file synced its folder
    state_lock, appended = threading.Lock(), threading.Barrier(8)
    released: list[int] = []

    def uploader(n: int) -> None:
        with state_lock:  # as the state appends, under its lock
            seq = _append(jr, n)
        appended.wait()  # every record is queued before anyone commits
        jr.commit(seq)
        released.append(seq)

    threads = [threading.Thread(target=uploader, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    assert sorted(released) == list(range(1, 9))
    assert fsync.calls == 1  # one thread wrote all eight, the others were released by it
    records = [r for _, r in journal.read(jr.path)[0]]
    assert [r.seq for r in records] == list(range(1, 9))
    assert sorted(r.fields["update_id"] for r in records) == [f"u{n}" for n in range(8)]


def test_a_failed_fsync_raises_and_the_next_commit_writes_the_records(tmp_path: Path) -> None:
    fsync = CountingFsync()
    jr = Journal(tmp_path / journal.FILE, fsync=fsync)
    fsync.fail = 1
    seq = _append(jr, 1)
    with pytest.raises(OSError, match="No space"):
        jr.commit(seq)
    assert jr.path.stat().st_size == 0  # the unsynced bytes were cut off again

    jr.commit(_append(jr, 2))
    assert [r.fields["update_id"] for _, r in journal.read(jr.path)[0]] == ["u1", "u2"]


def test_a_batch_that_fails_to_encode_is_kept_and_written_by_the_next_commit(
    tmp_path: Path, monkeypatch
) -> None:
    # Prepare: the first encoding of a batch fails with something other than OSError.
    jr = Journal(tmp_path / journal.FILE)
    real_encode, failures = journal.encode, [MemoryError("out of memory")]

    def encode_once_failing(record: journal.Record) -> bytes:
        if failures:
            raise failures.pop()
        return real_encode(record)

    monkeypatch.setattr(journal, "encode", encode_once_failing)
    seq = _append(jr, 1)
    with pytest.raises(MemoryError):
        jr.commit(seq)
    assert jr.path.stat().st_size == 0

    # Act: a waiter of that write leads the next one.
    jr.commit(seq)

    # Assert: it returned only once the record was on disk.
    assert [r.fields["update_id"] for _, r in journal.read(jr.path)[0]] == ["u1"]


def test_a_partial_write_left_behind_is_cut_off_before_the_next(
    tmp_path: Path, monkeypatch
) -> None:
    # Prepare: a write stops halfway, and cutting its bytes off fails too.
    jr = Journal(tmp_path / journal.FILE)
    real_write, real_ftruncate = journal._write_all, os.ftruncate
    broken = {"write": 1, "ftruncate": 1}

    def half_write(fd: int, data: bytes) -> None:
        if broken["write"]:
            broken["write"] -= 1
            real_write(fd, data[: len(data) // 2])
            raise OSError(5, "Input/output error")
        real_write(fd, data)

    def ftruncate_once_failing(fd: int, length: int) -> None:
        if broken["ftruncate"]:
            broken["ftruncate"] -= 1
            raise OSError(5, "Input/output error")
        real_ftruncate(fd, length)

    monkeypatch.setattr(journal, "_write_all", half_write)
    monkeypatch.setattr(journal.os, "ftruncate", ftruncate_once_failing)
    seq = _append(jr, 1)
    with pytest.raises(OSError, match="Input/output"):
        jr.commit(seq)
    assert jr.path.stat().st_size > 0  # the half record is still there

    # Act: the retry.
    jr.commit(seq)

    # Assert: the record acknowledged reads back (not behind a torn one that ends the journal).
    assert [r.fields["update_id"] for _, r in journal.read(jr.path)[0]] == ["u1"]


def test_a_commit_of_a_record_never_appended_is_refused(tmp_path: Path) -> None:
    jr = Journal(tmp_path / journal.FILE)
    seq = _append(jr, 1)
    raised: list[BaseException] = []

    def commit_beyond() -> None:  # in a thread: a journal that waits for it never returns
        try:
            jr.commit(seq + 1)
        except ValueError as exc:
            raised.append(exc)

    thread = threading.Thread(target=commit_beyond, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive() and "record 2 was never appended" in str(raised[0])
    jr.commit(seq)
    assert [r.seq for _, r in journal.read(jr.path)[0]] == [1]


def test_the_file_is_created_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        jr = Journal(tmp_path / journal.FILE)
    finally:
        os.umask(old)
    jr.commit(_append(jr, 1))
    assert stat.S_IMODE(jr.path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (lambda data: data[:-7], "a torn record"),
        (lambda data: data + b"FSJ1\x00", "a torn record header"),
        (lambda data: data + b"\x00" * 40, "a corrupt record header"),
        (lambda data: data[:-1] + bytes([data[-1] ^ 0xFF]), "a bad checksum"),
    ],
    ids=["torn-record", "torn-header", "garbage", "bad-checksum"],
)
def test_a_damaged_tail_is_skipped_with_a_log_line(tmp_path: Path, caplog, damage, said) -> None:
    jr = Journal(tmp_path / journal.FILE)
    for n in range(3):
        _append(jr, n)
    jr.commit()
    jr.close()
    data = jr.path.read_bytes()
    jr.path.write_bytes(damage(data))
    kept = 2 if said in ("a torn record", "a bad checksum") else 3

    with caplog.at_level(logging.WARNING):
        again = Journal(jr.path)
    assert [r.seq for r in again.records] == list(range(1, kept + 1))
    assert said in caplog.text
    # The tail is cut off: the next record follows the good ones and reads back.
    again.commit(_append(again, 9))
    assert [r.seq for _, r in journal.read(jr.path)[0]] == list(range(1, kept + 2))


def test_truncate_keeps_only_the_records_after_the_checkpoint(tmp_path: Path) -> None:
    jr = Journal(tmp_path / journal.FILE)
    for n in range(5):
        _append(jr, n)
    jr.commit()
    queued = _append(jr, 5)  # not written yet: it goes to the new file

    jr.truncate(3)
    jr.commit(queued)
    records = [r for _, r in journal.read(jr.path)[0]]
    assert [r.seq for r in records] == [4, 5, 6]
    np.testing.assert_array_equal(records[0].tensors["w"], _tensor(3.0)["w"])
    assert stat.S_IMODE(jr.path.stat().st_mode) == 0o600
    jr.truncate(6)
    assert jr.empty


# --- replay: every acknowledged update back in the state, once -------------------------


def _durable(make_app, **settings):
    return make_app(DURABLE="true", IDLE_SAVE_SECONDS=3600, **settings)


def _model(client) -> tuple[dict[str, np.ndarray], int, int]:
    """The served model's tensors, version and samples (the bytes' header order may vary)."""
    body, version, samples = served(client)
    return weights.decode(body)[0], version, samples


def _same(got, expected) -> None:
    assert got[1:] == expected[1:]
    assert sorted(got[0]) == sorted(expected[0])
    for name, tensor in expected[0].items():
        np.testing.assert_array_equal(got[0][name], tensor, err_msg=name)


def _train_task(client) -> dict:
    """The next training task handed out (the versions' evaluations come first)."""
    for _ in range(5):
        task = ask(client)["task"]
        if task is not None and task["kind"] == "train":
            return task
    raise AssertionError("no training task handed out")


def _kill(app) -> None:
    """A kill -9 as far as the disk knows: the state is dropped without a checkpoint."""
    state = state_of(app)
    if state.saver.journal is not None:
        state.saver.journal.close()


def test_async_updates_are_replayed_bit_for_bit_and_count_once(make_app) -> None:
    app = _durable(make_app, SAVE_MODEL=3)
    client = app.test_client()
    for n in range(5):
        assert (
            post(client, upload(1.0 + n, update_id=f"u{n}", num_samples=10 + n)).status_code == 200
        )
    before = _model(client)
    assert checkpoints.versions(model_dir(app)) == [3, 0]
    # The checkpoint of v3 cut its three records off the journal.
    records = journal.read(model_dir(app) / journal.FILE)[0]
    assert [r.fields["update_id"] for _, r in records] == ["u3", "u4"]
    _kill(app)

    client = _durable(make_app, SAVE_MODEL=3).test_client()
    _same(_model(client), before)
    for n in range(5):
        retry = post(client, upload(1.0 + n, update_id=f"u{n}", num_samples=10 + n))
        assert retry.get_json()["duplicate"] is True, n
    assert client.get("/v1/status").get_json()["updates"] == 5


def test_a_stale_base_only_in_memory_is_logged_with_its_update(make_app) -> None:
    # fedbuff measures an update against the version it was trained from. v3 is never
    # checkpointed: the journal keeps it with u4, so the replay makes the same v5.
    rule = {"AGGREGATION": "fedbuff", "FEDBUFF_K": 1, "SAVE_MODEL": 4}
    app = _durable(make_app, **rule)
    client = app.test_client()
    for n, base in enumerate([0, 0, 1, 2, 3]):
        body = upload(1.0 + n, update_id=f"u{n}", base_version=base)
        assert post(client, body).status_code == 200, n
    assert checkpoints.versions(model_dir(app)) == [4, 0]
    record = journal.read(model_dir(app) / journal.FILE)[0][-1][1]
    assert record.fields["base_used"] is True
    assert any(name.startswith("base/") for name in record.tensors)
    before = _model(client)
    _kill(app)

    _same(_model(_durable(make_app, **rule).test_client()), before)


def test_a_round_closed_on_time_and_the_open_round_are_replayed(make_app, clock) -> None:
    rule = {**ROUNDS, "ROUND_DEADLINE": 30, "SAVE_MODEL": 1}
    app = _durable(make_app, **rule)
    client = app.test_client()
    first = _train_task(client)
    assert post(client, answer(first, 1.0)).status_code == 200
    clock.advance(31)  # round 1 closes on time with one of its two clients
    status = client.get("/v1/status").get_json()
    assert status["version"] == 1 and status["round"]["number"] == 2
    second = _train_task(client)
    assert post(client, answer(second, 2.0)).status_code == 200  # waits in round 2
    before = _model(client)
    _kill(app)

    client = _durable(make_app, **rule).test_client()
    status = client.get("/v1/status").get_json()
    _same(_model(client), before)
    assert status["round"]["number"] == 2 and status["round"]["pending"] == 1
    retry = post(client, answer(second, 2.0))
    assert retry.get_json()["duplicate"] is True
    assert lookup(client, second["id"]).get_json()["state"] == "pending"


def test_a_retried_round_and_its_new_attempt_are_replayed(make_app, clock) -> None:
    rule = {**ROUNDS, "ROUND_DEADLINE": 30, "MIN_CLIENTS": 2, "SAVE_MODEL": 1}
    app = _durable(make_app, **rule)
    client = app.test_client()
    first = _train_task(client)
    assert post(client, answer(first, 1.0)).status_code == 200
    clock.advance(31)  # attempt 1 has 1 of the 2 it needs: round 1 is tried again
    second = _train_task(client)
    assert second["id"].startswith("r1a2.")
    assert post(client, answer(second, 2.0)).status_code == 200  # waits in attempt 2
    _kill(app)

    client = _durable(make_app, **rule).test_client()
    status = client.get("/v1/status").get_json()
    assert status["version"] == 0 and status["round"]["attempt"] == 2
    assert status["round"]["pending"] == 1
    assert post(client, answer(second, 2.0)).get_json()["duplicate"] is True
    assert post(client, answer(first, 1.0)).get_json()["error"] == "round_closed"


def test_an_update_the_journal_cannot_take_is_503_and_its_retry_a_duplicate(make_app) -> None:
    app = _durable(make_app, SAVE_MODEL=100)
    client = app.test_client()
    fsync = CountingFsync()
    state_of(app).saver.journal._fsync = fsync  # the disk fills up
    fsync.fail = 1
    body = upload(2.0, update_id="u1", num_samples=10)

    refused = post(client, body)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
    assert refused.get_json()["error"] == "unavailable"
    assert "journal cannot be written" in refused.get_json()["detail"]
    again = post(client, body)  # the disk has room again
    assert again.status_code == 200 and again.get_json()["duplicate"] is True
    records = journal.read(model_dir(app) / journal.FILE)[0]
    assert [r.fields["update_id"] for _, r in records] == ["u1"]


def test_a_torn_journal_tail_does_not_stop_the_start(make_app, caplog) -> None:
    app = _durable(make_app, SAVE_MODEL=100)
    client = app.test_client()
    for n in range(3):
        assert post(client, upload(1.0, update_id=f"u{n}", num_samples=10)).status_code == 200
    _kill(app)
    path = model_dir(app) / journal.FILE
    path.write_bytes(path.read_bytes()[:-100])  # the last record torn, as a kill mid-write

    with caplog.at_level(logging.INFO):
        client = _durable(make_app, SAVE_MODEL=100).test_client()
    status = client.get("/v1/status").get_json()
    assert (status["version"], status["samples"]) == (2, 20)
    assert "a torn record" in caplog.text and "2 records after the checkpoint" in caplog.text


def _journal_two_updates(make_app, **rule) -> Path:
    """Two updates acknowledged under DURABLE=true, in the journal only, then a kill."""
    app = _durable(make_app, SAVE_MODEL=100, **rule)
    for n in range(2):
        body = upload(1.0, update_id=f"u{n}", num_samples=10)
        assert post(app.test_client(), body).status_code == 200
    _kill(app)
    return model_dir(app) / journal.FILE


def test_without_durable_a_left_journal_is_checkpointed_and_removed_at_start(
    make_app, caplog
) -> None:
    path = _journal_two_updates(make_app)

    with caplog.at_level(logging.INFO):
        app = make_app(SAVE_MODEL=1, IDLE_SAVE_SECONDS=3600)

    # Before any request: the replayed state is in a checkpoint and the journal is gone.
    assert not path.exists()
    ckpt = checkpoints.load_newest(model_dir(app))
    assert ckpt is not None and ckpt.version == 2 and ckpt.metadata["journal_seq"] == "2"
    assert "journal replayed without DURABLE" in caplog.text
    client = app.test_client()
    assert client.get("/v1/status").get_json()["updates"] == 2
    # Nothing is journaled any more: the next update makes a checkpoint, not a journal.
    assert post(client, upload(1.0, update_id="u2", num_samples=10)).status_code == 200
    assert not path.exists() and state_of(app).saver.journal is None
    ckpt = checkpoints.load_newest(model_dir(app))
    assert ckpt is not None and ckpt.version == 3 and ckpt.metadata["journal_seq"] == "2"
    # A kill now loses nothing the journal held.
    _kill(app)
    again = make_app(SAVE_MODEL=1, IDLE_SAVE_SECONDS=3600).test_client()
    assert again.get("/v1/status").get_json()["updates"] == 3


def test_without_durable_a_journal_is_kept_until_its_checkpoint_can_be_written(
    make_app, monkeypatch
) -> None:
    path = _journal_two_updates(make_app)
    real_save = checkpoints.save

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    # Prepare: the start's checkpoint cannot be written.
    monkeypatch.setattr(checkpoints, "save", full_disk)
    app = make_app(SAVE_MODEL=100, IDLE_SAVE_SECONDS=3600)
    client = app.test_client()
    assert path.exists() and state_of(app).saver.journal is None
    refused = post(client, upload(1.0, update_id="u2", num_samples=10))
    assert refused.status_code == 503  # until the replayed updates are safe

    # Act: the disk works again and the next tick writes the checkpoint.
    monkeypatch.setattr(checkpoints, "save", real_save)
    state_of(app).tick()

    # Assert: the checkpoint holds the replayed updates; the journal is gone.
    ckpt = checkpoints.load_newest(model_dir(app))
    assert ckpt is not None and ckpt.version == 2 and ckpt.metadata["journal_seq"] == "2"
    assert not path.exists()
    assert post(client, upload(1.0, update_id="u2", num_samples=10)).status_code == 200
    assert not path.exists()


def test_without_durable_the_open_rounds_replayed_updates_are_said_to_be_unsaved(
    make_app, caplog
) -> None:
    app = _durable(make_app, **ROUNDS, SAVE_MODEL=1)
    client = app.test_client()
    task = _train_task(client)
    assert post(client, answer(task, 1.0)).status_code == 200  # waits in round 1
    _kill(app)
    path = model_dir(app) / journal.FILE

    with caplog.at_level(logging.WARNING):
        client = make_app(**ROUNDS, SAVE_MODEL=1, IDLE_SAVE_SECONDS=3600).test_client()

    assert client.get("/v1/status").get_json()["round"]["pending"] == 1
    assert not path.exists()
    assert "the open round's updates replayed from journal" in caplog.text


# --- a real gunicorn, killed with SIGKILL under eight uploaders ---------------------------


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _kill9(server: Server) -> None:
    """SIGKILL gunicorn's master, then its worker (which holds the state)."""
    workers = _children(server.proc.pid)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=30)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Uploaders:
    """Eight hand-started clients, each pushing its own PER_UPLOADER updates one after
    another and retrying one until it is acknowledged (200), as a client without an outbox
    would. `current[k]` is the update uploader k is pushing, None once it is acknowledged;
    `errors` the answers that were neither 200 nor a 429 or 503 to retry."""

    PER_UPLOADER = 25  # 200 in all: fewer than a checkpoint remembers (ledger.SAVED_IDS)

    def __init__(self, url: list[str]) -> None:
        self.url, self.acked, self.errors = url, [], []
        self.lock = threading.Lock()
        self.current: list[str | None] = [None] * 8
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(k,)) for k in range(8)]

    def _run(self, k: int) -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {WORKERS_TOKEN}"
        for n in range(self.PER_UPLOADER):
            update_id = self.current[k] = f"hand{k}-{n}"
            body = upload(float(k + 1), client_id=f"client-{k % 3 + 1}", update_id=update_id,
                          num_samples=1)  # fmt: skip
            while not self.stop.is_set():
                try:
                    answer = session.post(self.url[0] + "/v1/updates", data=body, timeout=10)
                except requests.RequestException:
                    self.stop.wait(0.05)  # the aggregator is down: push it again soon
                    continue
                if answer.status_code == 200:
                    with self.lock:
                        self.acked.append(update_id)
                        self.current[k] = None
                    break
                if answer.status_code not in (429, 503):
                    self.errors.append(f"{update_id}: {answer.status_code} {answer.text}")
                    return
            if self.stop.is_set():
                return

    def count(self) -> int:
        """Updates acknowledged so far; fails the test on an unexpected answer."""
        assert not self.errors, self.errors
        with self.lock:
            return len(self.acked)

    def __enter__(self) -> Uploaders:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


@pytest.fixture
def durable_dir(tmp_path: Path) -> Iterator[Path]:
    prepared(tmp_path)
    yield tmp_path


def _known(server: Server, update_ids: list[str]) -> list[str]:
    return [
        i
        for i in update_ids
        if requests.get(f"{server.url}/v1/updates/{i}", timeout=10).status_code == 200
    ]


@pytest.mark.slow  # about ten seconds: four gunicorn starts
def test_kill9_under_eight_uploaders_loses_no_acknowledged_update(durable_dir: Path) -> None:
    # A checkpoint every 100 updates: the first kill (at 40 acknowledged) comes before any,
    # so its restart must find them in the journal alone; the third (at 120) after one, so
    # a restart replays the journal's records beyond a checkpoint's. With checkpoints
    # every few updates a loaded machine could leave no record beyond the last one at
    # every kill, and the journal would go untested.
    env = {"DURABLE": "true", "SAVE_MODEL": 100, "IDLE_SAVE_SECONDS": 3600, "THREADS": 8}
    servers = [start_gunicorn(durable_dir, **env)]
    try:
        wait_healthy(servers[-1])
        url = [servers[-1].url]  # the uploaders follow the aggregator to its new port
        with Uploaders(url) as uploaders:
            for target in (40, 80, 120):  # kill once this many of the 200 are acknowledged
                wait_until(lambda t=target: uploaders.count() >= t, 60, servers[-1].output)
                _kill9(servers[-1])
                acked = list(uploaders.acked)
                servers.append(start_gunicorn(durable_dir, **env))
                wait_healthy(servers[-1])
                # Before any retry reaches it: every update acknowledged before the kill
                # is in the resumed state.
                missing = sorted(set(acked) - set(_known(servers[-1], acked)))
                assert not missing, servers[-1].output()
                url[0] = servers[-1].url
            wait_until(lambda: uploaders.count() >= 8 * Uploaders.PER_UPLOADER, 60,
                       servers[-1].output)  # fmt: skip
        server = servers[-1]
        status = requests.get(server.url + "/v1/status", timeout=10).json()
        acked = list(uploaders.acked)
        assert len(set(acked)) == len(acked) == 8 * Uploaders.PER_UPLOADER
        # None twice: one update and one sample per update acknowledged.
        assert status["updates"] == len(acked) and status["samples"] == len(acked), status
        assert len(_known(server, acked)) == len(acked)
        # The journal was needed: the first restart found the acknowledged updates only
        # there, the third found records beyond the checkpoint written at the 100th.
        assert "records after the checkpoint's 0 replayed" in servers[1].output()
        assert re.search(r"records after the checkpoint's [1-9]\d* replayed", servers[3].output())
    finally:
        for server in servers:
            if server.proc.poll() is None:
                server.stop()
