"""Checkpoints through the API: when they are written (every SAVE_MODEL updates, when idle,
on close), what a restart resumes from and refuses, the saved update ids, and a failing
disk."""

from __future__ import annotations

import errno
import json
import logging
import threading

import numpy as np
import pytest

from fedsim import checkpoints, weights
from fedsim.aggregator.app import create_app
from helpers import (
    lookup,
    model_dir,
    post,
    served,
    state_of,
    tensors,
    upload,
    wait_until,
    write_plan,
    write_tokens,
    write_v0,
)

# --- checkpoints and resume -----------------------------------------------------------


def test_checkpoint_every_save_model_updates(make_app) -> None:
    app = make_app(SAVE_MODEL=3)
    client = app.test_client()
    ids = ["u1", "u2", "u3"]
    for i, update_id in enumerate(ids[:2]):
        post(client, upload(1.0 + i, update_id=update_id))
    assert checkpoints.versions(model_dir(app)) == [0]
    assert client.get("/v1/status").get_json()["unsaved_updates"] == 2
    post(client, upload(3.0, update_id="u3"))
    assert checkpoints.versions(model_dir(app)) == [3, 0]
    ckpt = checkpoints.read(checkpoints.path_for(model_dir(app), 3))
    assert ckpt.metadata["samples"] == "300"
    assert ckpt.metadata["strategy"] == "async-weighted"
    assert json.loads(ckpt.metadata["applied_ids"]) == ids
    assert (model_dir(app) / "latest").read_text().strip() == "ckpt-3.safetensors"
    status = client.get("/v1/status").get_json()
    assert status["unsaved_updates"] == 0
    assert status["last_checkpoint"]["version"] == 3


def test_resume_from_newest_checkpoint_keeps_dedup(make_app) -> None:
    first = make_app(SAVE_MODEL=2)
    post(first.test_client(), upload(2.0, update_id="u1", num_samples=100))
    post(first.test_client(), upload(4.0, update_id="u2", num_samples=100))  # checkpoint v2
    # A restart: a new app on the same folder.
    client = make_app(SAVE_MODEL=2).test_client()
    body, version, samples = served(client)
    assert (version, samples) == (2, 200)
    np.testing.assert_allclose(weights.decode(body)[0]["output/bias"], 3.0, rtol=1e-6)
    retry = post(client, upload(2.0, update_id="u1", num_samples=100))
    assert retry.get_json() == {"accepted": True, "version": 2, "duplicate": True, "seq": 1}


def test_corrupt_newest_checkpoint_is_skipped(make_app, make_settings, caplog) -> None:
    settings = make_settings()
    write_v0(settings.model_dir)
    checkpoints.save(
        settings.model_dir, 1, tensors("mlp", 1.0), {"samples": 7, "model": "mlp"}, keep=5
    )
    good = checkpoints.path_for(settings.model_dir, 1).read_bytes()
    checkpoints.path_for(settings.model_dir, 2).write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.INFO):
        client = make_app().test_client()
    assert served(client)[1:] == (1, 7)
    assert "skipping checkpoint" in caplog.text and "ckpt-2" in caplog.text
    assert "resumed from" in caplog.text and "ckpt-1" in caplog.text


def test_refuses_to_start_without_a_checkpoint(make_app, caplog) -> None:
    with pytest.raises(SystemExit) as info:
        make_app(write=False)
    assert info.value.code == 3  # gunicorn stops instead of respawning the worker
    message = str(info.value.__cause__)
    assert "no checkpoint in" in message
    assert "python -m fedsim.prepare" in message and "docker compose up" in message
    assert message in caplog.text


def test_refuses_a_checkpoint_of_another_model(make_app, make_settings, caplog) -> None:
    write_v0(make_settings().model_dir, model="cnn")
    with pytest.raises(SystemExit):
        make_app()
    assert "holds model 'cnn' but MODEL=mlp" in caplog.text


def test_a_checkpoint_with_the_wrong_layout_is_skipped(make_app, make_settings, caplog) -> None:
    # No model named in the metadata: the layout itself is checked, and a checkpoint
    # that does not fit is skipped like a corrupt one.
    model_dir = make_settings().model_dir
    write_v0(model_dir)
    checkpoints.save(model_dir, 1, tensors("cnn"), {"samples": 0}, keep=5)
    client = make_app().test_client()
    assert client.get("/healthz").get_json()["version"] == 0
    assert "skipping checkpoint" in caplog.text and "ckpt-1" in caplog.text
    assert "wrong tensor names" in caplog.text


def test_the_aggregator_refuses_a_plan_made_with_other_settings(make_settings, caplog) -> None:
    made = make_settings(PARTITION="iid", NUM_CLIENTS=10)
    write_v0(made.model_dir)
    write_plan(made)
    write_tokens(made)
    settings = make_settings()  # the default: PARTITION=slices
    with pytest.raises(SystemExit):
        create_app({"TESTING": True, "FEDSIM_SETTINGS": settings, "FEDSIM_TICKER": False})
    assert "does not match the settings: PARTITION is slices here, iid in" in caplog.text
    assert "reset with `docker compose down -v`" in caplog.text


def test_saved_update_ids_are_bounded_so_the_checkpoint_reads_back(make_app) -> None:
    app = make_app(SAVE_MODEL=1000)
    client = app.test_client()
    long_id = "\u00e9" * 120  # 6 bytes each once JSON-escaped: ~43 ids fit in 32 kB
    for i in range(60):
        post(client, upload(1.0, update_id=f"{long_id}{i:03d}"))
    state_of(app).close()
    ckpt = checkpoints.load_newest(model_dir(app))
    assert ckpt is not None and ckpt.version == 60
    saved = json.loads(ckpt.metadata["applied_ids"])
    assert 0 < len(saved) < 60
    assert saved[-1] == f"{long_id}059"


# --- idle saves and close -------------------------------------------------------------


def test_idle_save_with_a_fake_clock(make_app, clock) -> None:
    app = make_app(SAVE_MODEL=10, IDLE_SAVE_SECONDS=5)
    post(app.test_client(), upload(1.0))
    state_of(app).tick()
    assert checkpoints.versions(model_dir(app)) == [0]
    clock.advance(5)
    state_of(app).tick()
    assert checkpoints.versions(model_dir(app)) == [1, 0]


def test_idle_save_by_the_background_ticker(make_app) -> None:
    app = make_app(SAVE_MODEL=10, IDLE_SAVE_SECONDS=0.1, ticker=True)
    try:
        post(app.test_client(), upload(1.0))
        wait_until(  # up to ~10 s on a loaded machine; usually ~0.2 s
            lambda: checkpoints.versions(model_dir(app))[0] == 1,
            10,
            "the ticker saved no checkpoint of version 1",
        )
    finally:
        state_of(app).close()


def test_close_checkpoints_unsaved_updates(make_app) -> None:
    app = make_app(SAVE_MODEL=10)
    post(app.test_client(), upload(1.0, update_id="last"))
    state_of(app).close()
    ckpt = checkpoints.load_newest(model_dir(app))
    assert ckpt is not None and ckpt.version == 1
    assert json.loads(ckpt.metadata["applied_ids"]) == ["last"]


# --- the writer thread ------------------------------------------------------------------


class HeldWrites:
    """checkpoints.save that records each version asked for and waits at the first until
    `release`; once `crashed`, it writes nothing (the process is gone)."""

    def __init__(self, real) -> None:
        self.real, self.versions = real, []
        self.entered, self.release = threading.Event(), threading.Event()
        self.crashed = False

    def __call__(self, model_dir, version, *args, **kwargs):
        self.versions.append(version)
        self.entered.set()
        assert self.release.wait(20), "the test never released the write"
        if self.crashed:
            raise OSError(errno.EIO, "the aggregator was killed")
        return self.real(model_dir, version, *args, **kwargs)


def test_the_writer_thread_writes_checkpoints_and_the_newest_version_wins(
    make_app, monkeypatch
) -> None:
    app = make_app(SAVE_MODEL=2, ticker=True)
    held = HeldWrites(checkpoints.save)
    monkeypatch.setattr(checkpoints, "save", held)
    client = app.test_client()
    try:
        # Prepare: update 2 makes a checkpoint due; the writer thread takes version 2 and
        # its write is held. Execute: the requests are answered all the same, and two more
        # updates arrive while the write is held.
        for n in (1, 2):
            assert post(client, upload(float(n), update_id=f"u{n}")).status_code == 200
        assert held.entered.wait(10), "no checkpoint write started"
        for n in (3, 4):
            assert post(client, upload(float(n), update_id=f"u{n}")).status_code == 200
        held.release.set()
        # Assert: after version 2 the next write takes the newest version, 4; 3 is never
        # written on its own.
        wait_until(lambda: checkpoints.versions(model_dir(app))[0] == 4, 10, "no v4 written")
        assert held.versions == [2, 4]
    finally:
        state_of(app).close()
    ckpt = checkpoints.read(checkpoints.path_for(model_dir(app), 4))
    assert json.loads(ckpt.metadata["applied_ids"]) == ["u1", "u2", "u3", "u4"]
    # A restart resumes from it.
    assert served(make_app(SAVE_MODEL=2).test_client())[1:] == (4, 400)


def test_close_with_the_writer_thread_running_saves_the_newest_version(make_app) -> None:
    app = make_app(SAVE_MODEL=10, IDLE_SAVE_SECONDS=3600, ticker=True)
    for n in (1, 2, 3):  # none due: fewer than SAVE_MODEL, never idle
        assert post(app.test_client(), upload(float(n), update_id=f"u{n}")).status_code == 200
    state_of(app).close()  # as SIGTERM does: the thread stops, then a last write
    assert checkpoints.versions(model_dir(app)) == [3, 0]
    assert served(make_app(SAVE_MODEL=10).test_client())[1:] == (3, 300)


def test_durable_updates_acknowledged_before_their_checkpoint_survive_a_kill(
    make_app, monkeypatch
) -> None:
    first = make_app(SAVE_MODEL=1, DURABLE="true", ticker=True)
    held = HeldWrites(checkpoints.save)
    monkeypatch.setattr(checkpoints, "save", held)
    client = first.test_client()
    try:
        # Prepare: three updates acknowledged while the first checkpoint write is held.
        for n in (1, 2, 3):
            assert post(client, upload(float(n), update_id=f"u{n}")).status_code == 200
        assert held.entered.wait(10)
        assert checkpoints.versions(model_dir(first)) == [0]
        # Execute: the aggregator is killed before any checkpoint is written, and starts
        # again on the same folder.
        held.crashed = True
        again = make_app(SAVE_MODEL=1, DURABLE="true").test_client()
    finally:
        held.release.set()
        state_of(first).close()  # its writes fail: nothing of the killed process is written
    # Assert: the journal gave every acknowledged update back, once.
    assert served(again)[1:] == (3, 300)
    for n in (1, 2, 3):
        assert lookup(again, f"u{n}").get_json()["version"] == n
    assert checkpoints.versions(model_dir(first)) == [0]


# --- disk faults ----------------------------------------------------------------------


def test_a_failing_disk_refuses_new_updates_with_503_and_recovers(make_app, monkeypatch) -> None:
    import errno

    app = make_app(SAVE_MODEL=1)
    client = app.test_client()
    real_save = checkpoints.save

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    # Prepare: the disk fills up; an update is accepted but its checkpoint fails.
    monkeypatch.setattr(checkpoints, "save", full_disk)
    assert post(client, upload(1.0, update_id="kept")).status_code == 200
    health = client.get("/healthz").get_json()
    assert health["status"] == "degraded" and "No space left" in health["detail"]
    # Execute: the next update is refused with 503 and changes nothing.
    before = served(client)
    refused = post(client, upload(5.0, update_id="later"))
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
    assert refused.get_json()["error"] == "unavailable"
    assert served(client) == before
    assert any("failed" in e["text"] for e in client.get("/v1/status").get_json()["events"])
    # The disk works again: the next tick saves the acknowledged update, and updates flow.
    monkeypatch.setattr(checkpoints, "save", real_save)
    state_of(app).tick()
    assert client.get("/healthz").get_json()["status"] == "ok"
    assert checkpoints.load_newest(model_dir(app)).version == 1
    assert lookup(client, "kept").get_json()["state"] == "saved"
    assert post(client, upload(5.0, update_id="later")).status_code == 200


def test_a_checkpoint_does_not_grow_with_the_number_of_clients(make_settings, clock) -> None:
    """Its metadata holds the open round's sample (C numbers), no record per client: 10,000
    clients' checkpoint is 100 clients' but for the sampled numbers' extra digits."""
    from helpers import build_app

    sizes = {}
    for n in (100, 10_000):
        app = build_app(
            make_settings, clock, MODEL_DIR=make_settings().model_dir.parent / f"m{n}",
            PARTITION="iid", NUM_CLIENTS=n, CLIENTS_PER_ROUND=50, AGGREGATION="fedavg",
        )  # fmt: skip
        state = state_of(app)
        state.ask("worker-1")  # round 1 opens: its sample is saved with the checkpoint
        state.saver.changed(clock(), held=True)
        sizes[n] = state.save_if_due(force=True).stat().st_size

    assert 0 <= sizes[10_000] - sizes[100] <= 50 * 3  # at most 3 more digits a sampled number
