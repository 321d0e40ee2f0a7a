"""The per-client quota: what one admitted client may contribute to a window of versions,
the 429 and Retry-After beyond it, and what it leaves as it was."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
import requests
from flask.testing import FlaskClient

from fedsim import config
from fedsim.aggregator.quota import OverQuota, Quota
from fedsim.aggregator.strategies import Refused, Update
from fedsim.client.transport import RetryPolicy, Transport
from fedsim.protocol import UpdateMeta
from helpers import (
    TYPED_TOKEN,
    FakeClock,
    InProcess,
    bearer,
    model_dir,
    post,
    served,
    tensors,
    upload,
)


def update(client: str = "alice", samples: int = 100, task: str | None = None) -> Update:
    return Update(client, f"{client}-{samples}", 0, samples, {}, {}, task, "")


def quota(versions: int = 3, clock: FakeClock | None = None, mode: str = "async") -> Quota:
    return Quota(
        versions=versions,
        shares={"client-1": 300},
        outside=500,
        mode=mode,
        clock=clock or FakeClock(),
    )


def take(q: Quota, u: Update, version: int) -> None:
    with q.charge(u, version):
        pass


# --- the window, without HTTP ------------------------------------------------------------------


def test_a_client_takes_its_share_of_a_window_and_no_more() -> None:
    q = quota(versions=3)
    take(q, update("client-1", 200), 0)
    take(q, update("client-1", 100), 1)
    with pytest.raises(OverQuota) as over:
        take(q, update("client-1", 1), 2)
    assert (over.value.status, over.value.code) == (429, "over_quota")
    assert "client client-1 contributed 300 samples" in over.value.reason
    assert "share of 300" in over.value.reason
    assert q.used("client-1", 2) == 300  # the refused update was not counted
    # Version 3: the 200 samples taken at version 0 have left the window.
    take(q, update("client-1", 200), 3)
    assert q.used("client-1", 3) == 300


def test_the_refusal_says_when_the_update_fits_again() -> None:
    q = quota(versions=4)
    take(q, update("client-1", 100), 0)
    take(q, update("client-1", 100), 1)
    take(q, update("client-1", 100), 2)
    with pytest.raises(OverQuota) as over:
        take(q, update("client-1", 150), 3)
    # 150 fits once two of the three 100s are gone: the one of version 1 leaves at 5.
    assert "it fits again 2 versions from now" in over.value.reason


def test_retry_after_is_the_versions_to_wait_at_the_pace_seen_so_far() -> None:
    clock = FakeClock(0.0)
    q = quota(versions=2, clock=clock)
    take(q, update("bob", 10), 0)
    clock.advance(30.0)
    take(q, update("alice", 400), 1)  # version 1 first seen 30 s after version 0
    with pytest.raises(OverQuota) as over:
        take(q, update("alice", 400), 1)
    assert over.value.retry_after == 60  # 2 versions to wait, 30 s each so far


def test_clients_are_counted_apart_and_outsiders_get_the_largest_share() -> None:
    q = quota()
    assert (q.share("client-1"), q.share("alice")) == (300, 500)
    take(q, update("alice", 500), 0)
    take(q, update("bob", 500), 0)  # alice's use is not bob's
    with pytest.raises(OverQuota):
        take(q, update("alice", 1), 0)


def test_more_than_the_whole_share_is_422_not_429() -> None:
    with pytest.raises(Refused) as refused:
        take(quota(), update("client-1", 301), 0)
    assert (refused.value.status, refused.value.code) == (422, "bad_num_samples")
    assert "more than client client-1's share of 300 samples" in refused.value.reason


def test_a_tasks_result_counts_but_is_never_refused() -> None:
    q = quota()
    take(q, update("client-1", 300, task="u1.c1"), 0)
    take(q, update("client-1", 300, task="u2.c1"), 0)  # the plan handed it out: never 429
    assert q.used("client-1", 0) == 600
    with pytest.raises(OverQuota):
        take(q, update("client-1", 1), 0)  # but it leaves no room for pushes without a task


def test_an_update_refused_later_is_not_counted() -> None:
    q = quota()
    with pytest.raises(Refused), q.charge(update("client-1", 300), 0):
        raise Refused("bad_aggregate", "the rule refused it")
    assert q.used("client-1", 0) == 0
    take(q, update("client-1", 300), 0)


def test_round_rules_leave_the_quota_to_the_plan() -> None:
    q = quota(mode="rounds")
    for _ in range(3):
        take(q, update("client-1", 300), 0)
    assert q.used("client-1", 0) == 0


# --- through the API ---------------------------------------------------------------------------


def saved_files(app) -> dict[str, str]:
    """What MODEL_DIR holds: each file's name and a digest of its bytes."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(model_dir(app)).iterdir())
        if p.is_file()
    }


def test_a_hand_started_client_beyond_its_share_gets_429_and_changes_nothing(make_app) -> None:
    # Prepare: the default plan (3 clients of 4 slices of 5,000 images): a client outside it
    # may contribute 20,000 samples to any 5 consecutive versions, so 4 pushes of 5,000.
    app = make_app(SAVE_MODEL=1, CLIENT_QUOTA_VERSIONS=5)
    client: FlaskClient = app.test_client()
    typed = bearer(TYPED_TOKEN)
    for n in range(4):
        pushed = post(client, upload(1.0, client_id="typed", num_samples=5000), headers=typed)
        assert pushed.status_code == 200 and pushed.get_json()["version"] == n + 1
    before, files = served(client), saved_files(app)

    # Act: a fifth push inside the window.
    over = post(client, upload(9.0, client_id="typed", num_samples=5000), headers=typed)

    # Assert: 429 with the reason and a Retry-After; nothing served or saved changed.
    assert over.status_code == 429
    body = over.get_json()
    assert body["error"] == "over_quota"
    assert (
        "client typed contributed 20000 samples to the last 5 consecutive versions"
        in (body["detail"])
    )
    assert int(over.headers["Retry-After"]) >= 1
    assert served(client) == before and saved_files(app) == files

    # Once another client's update moves the window past version 0, it fits again.
    assert post(client, upload(2.0, client_id="other", num_samples=10)).status_code == 200
    again = post(client, upload(9.0, client_id="typed", num_samples=5000), headers=typed)
    assert again.status_code == 200 and again.get_json()["duplicate"] is False


def test_a_hand_started_client_over_its_share_waits_the_retry_after_it_is_sent(
    make_app, clock, caplog
) -> None:
    # Prepare: client "typed" has used its share (as above), a version a minute; the
    # aggregator's hint for it is beyond the client's random wait (MAX_WAIT 2 s).
    app = make_app(CLIENT_QUOTA_VERSIONS=5)
    client: FlaskClient = app.test_client()
    typed = bearer(TYPED_TOKEN)
    for _ in range(4):
        clock.advance(60.0)
        pushed = post(client, upload(1.0, client_id="typed", num_samples=5000), headers=typed)
        assert pushed.status_code == 200
    over = post(client, upload(9.0, client_id="typed", num_samples=5000), headers=typed)
    assert over.status_code == 429
    hint = int(over.headers["Retry-After"])
    assert hint > 2
    session = requests.Session()
    session.mount("http://fedsim/", InProcess(lambda: app))
    waits: list[float] = []
    policy = RetryPolicy(2, 2.0, sleep=waits.append, uniform=lambda lo, hi: hi)
    link = Transport("http://fedsim", policy=policy, timeout=5, session=session, token=TYPED_TOKEN)
    meta = UpdateMeta(client_id="typed", update_id="late", base_version=0, num_samples=5000)

    # Act: the client's own push, through its transport.
    with caplog.at_level(logging.INFO, logger="fedsim.client.transport"):
        pushed = link.push(tensors("mlp", 9.0), meta)

    # Assert: it waited as long as the aggregator said before its second try, and said why.
    assert not pushed.accepted and pushed.detail == "HTTP 429"
    assert waits == [float(hint)]
    assert f"failed: HTTP 429; next try in {hint:.1f}s (Retry-After: {hint})" in caplog.text


def test_an_update_over_the_whole_share_is_422_through_the_api(make_app) -> None:
    app = make_app(PARTITION="iid", NUM_CLIENTS=100, NUM_IMAGES_TRAIN=5000)
    client = app.test_client()
    before, files = served(client), saved_files(app)
    # client-3 of the plan holds a hundredth of the images; 5,000 is more than that.
    refused = post(client, upload(1.0, client_id="client-3", num_samples=5000))
    assert refused.status_code == 422 and refused.get_json()["error"] == "bad_num_samples"
    assert "more than client client-3's share of" in refused.get_json()["detail"]
    assert served(client) == before and saved_files(app) == files


@pytest.mark.parametrize("raw", ["0", "ten", "-3", "1000001"])
def test_a_bad_window_stops_the_start_with_one_line_naming_it(make_settings, raw: str) -> None:
    with pytest.raises(config.ConfigError) as refused:
        make_settings(CLIENT_QUOTA_VERSIONS=raw)
    assert str(refused.value).startswith(f"invalid setting CLIENT_QUOTA_VERSIONS={raw!r}: ")
    assert "\n" not in str(refused.value)


def test_a_rosters_shares_are_its_clients_samples_and_the_largest_is_the_outsiders(
    make_settings,
) -> None:
    from fedsim.aggregator.tasks import Client
    from fedsim.aggregator.tasks.roster import Roster

    listed = [Client(1, 300, "0" * 64), Client(2, 7000, "1" * 64), Client(3, 20, "2" * 64)]
    settings = make_settings(NUM_IMAGES_TRAIN=5000)

    by_roster = Quota.of(Roster.of_clients(listed), settings, "async", FakeClock())
    by_list = Quota.of(listed, settings, "async", FakeClock())

    for client in ("client-1", "client-2", "client-3", "client-4", "typed"):
        assert by_roster.share(client) == by_list.share(client)
    assert by_roster.share("client-2") == 7000 and by_roster.share("typed") == 7000
