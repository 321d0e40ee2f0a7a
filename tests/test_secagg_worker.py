"""The worker's side: the secret file, the masking stage, phase tasks and refusals."""

from __future__ import annotations

import logging
import stat

import numpy as np
import pytest

from fedsim.client.secagg import SecaggWorker
from fedsim.pipeline.base import Outgoing
from fedsim.pipeline.secagg import fixedpoint, party
from fedsim.pipeline.secagg.stage import Mask, ensure_secret, read_secret
from fedsim.pipeline.secagg.vectors import flat, unflat
from fedsim.protocol import Invalid, SecaggTask
from fedsim.protocol.secagg import blobs_json, keys_json

NONCE = bytes(range(16))


def test_the_secret_file_is_made_once_owner_only(tmp_path) -> None:
    path = tmp_path / "w" / "secagg.key"
    assert ensure_secret(path) is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = read_secret(path)
    assert len(secret) == 32
    assert ensure_secret(path) is False and read_secret(path) == secret


def test_a_missing_or_corrupt_secret_is_named(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"SECAGG_KEY_FILE .*does not exist: run prepare"):
        read_secret(tmp_path / "none")
    bad = tmp_path / "bad"
    bad.write_text("xyz\n")
    with pytest.raises(ValueError, match="not 64 hex digits"):
        read_secret(bad)
    with pytest.raises(ValueError, match="not 64 hex digits"):
        ensure_secret(bad)  # never replaced silently


def test_vectors_round_trip_in_sorted_name_order() -> None:
    tensors = {"b": np.arange(3, dtype=np.float32), "a": np.ones((2, 2), np.float32)}
    v = flat(tensors)
    assert v.tolist() == [1, 1, 1, 1, 0, 1, 2]
    back = unflat(v, tensors)
    assert list(back) == ["b", "a"] and all(np.array_equal(back[k], tensors[k]) for k in tensors)
    with pytest.raises(ValueError, match="a vector of 6 values"):
        unflat(v[:6], tensors)


def test_the_stage_masks_the_delta(tmp_path) -> None:
    key = tmp_path / "k"
    ensure_secret(key)
    secret = read_secret(key)
    clients = [1, 2, 3]
    keys = {u: party.advertise(secret, u, 1, NONCE) for u in clients}
    base = {"w": np.full((2, 3), 0.5, np.float32), "b": np.zeros(3, np.float32)}
    trained = {"w": np.full((2, 3), 0.75, np.float32), "b": np.full(3, -0.25, np.float32)}
    task = {"client": "client-2", "round": 1, "samples": 40,
            "secagg": {"nonce": NONCE.hex(), "keys": keys_json(keys)}}  # fmt: skip
    out = Mask(key).worker(Outgoing(base, trained, task))
    assert all(t.dtype == np.uint64 for t in out.tensors.values())
    assert out.meta["secagg"] == NONCE.hex()
    delta = flat({k: trained[k] - base[k] for k in base})
    plain = fixedpoint.encode(delta, 40)
    assert not np.array_equal(flat(out.tensors), plain)
    me = party.crypto.client_secrets(secret, 2, 1, NONCE)
    unmasked = flat(out.tensors) - party.masks(me, 2, party.crypto.context(1, NONCE), keys, 9)
    assert np.array_equal(unmasked, plain)  # exactly the masks on the encoded weighted delta
    with pytest.raises(ValueError, match="carries no masking"):
        Mask(key).worker(Outgoing(base, trained, {k: v for k, v in task.items() if k != "secagg"}))


def unmask_task(secret, client, survivors, dropped) -> SecaggTask:
    clients = sorted({*survivors, *dropped, client})
    keys = {u: party.advertise(secret, u, 1, NONCE) for u in clients}
    sent = {v: party.share_keys(secret, v, 1, NONCE, keys, 2)[client] for v in clients}
    return SecaggTask(
        f"r1.c{client}.unmask", "ab" * 8, f"client-{client}", 1, "unmask", NONCE.hex(), 2,
        keys_json(keys), blobs_json(sent), [f"client-{v}" for v in survivors],
        [f"client-{v}" for v in dropped],
    )  # fmt: skip


class Recording:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []

    def send(self, path, **kwargs):
        self.sent.append((path, kwargs))
        return 200, {"recorded": True}, 0


def test_a_worker_asked_for_both_shares_of_one_client_refuses_and_sends_nothing(
    tmp_path, caplog
) -> None:
    key = tmp_path / "k"
    ensure_secret(key)
    transport = Recording()
    worker = SecaggWorker(key, transport)  # type: ignore[arg-type]
    task = unmask_task(read_secret(key), 1, [1, 2, 3], [3])
    with caplog.at_level(logging.WARNING):
        assert worker.phase(task, "wk", "w1") is False
    assert transport.sent == []
    assert "refused: asked for both shares of client 3" in caplog.text
    fine = unmask_task(read_secret(key), 1, [1, 2], [3])
    assert worker.phase(fine, "wk", "w1") is True
    path, kwargs = transport.sent[0]
    assert path == "/v1/secagg" and set(kwargs["json"]["message"]) == {"client-1", "client-2",
                                                                       "client-3"}  # fmt: skip


def test_phase_tasks_round_trip_and_bad_ones_are_refused() -> None:
    task = SecaggTask("r1.c2.keys", "ab" * 8, "client-2", 1, "keys", NONCE.hex(), 3)
    assert SecaggTask.from_json(task.to_json()) == task
    for key, bad in (("phase", "steal"), ("nonce", "00"), ("client", "me"), ("round", 0),
                     ("keys", {"client-1": ["00", "11"]}), ("survivors", ["x"])):  # fmt: skip
        with pytest.raises(Invalid):
            SecaggTask.from_json({**task.to_json(), key: bad})


@pytest.mark.parametrize(
    ("weight", "ok"),
    [
        (None, True),
        (1, True),
        (600, True),
        (0, False),
        (-2, False),
        (True, False),
        (1.5, False),
        ("3", False),
    ],
)
def test_a_maskings_weight_is_a_whole_number_of_at_least_one(weight, ok) -> None:
    from fedsim.protocol import Invalid, Masking
    from fedsim.protocol.secagg import keys_json

    keys = keys_json({1: (b"\x01" * 32, b"\x02" * 32), 2: (b"\x03" * 32, b"\x04" * 32)})
    data = {"nonce": "ab" * 16, "keys": keys, **({} if weight is None else {"weight": weight})}
    if ok:
        masking = Masking.from_json(data)
        assert masking.weight == weight and Masking.from_json(masking.to_json()) == masking
    else:
        with pytest.raises(Invalid, match="a masking's weight must be an integer >= 1"):
            Masking.from_json(data)
