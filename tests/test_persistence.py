"""What the aggregator starts from: here, the population (clients.json) beside the plan."""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from fedsim.aggregator import persistence
from fedsim.aggregator.persistence import StartupError
from fedsim.protocol import Profile
from helpers import state_of, write_plan, write_population, write_v0


def prepared(make_settings, population: bool = True, **overrides: object):
    settings = make_settings(MODEL="mlp", **overrides)
    write_v0(settings.model_dir)
    write_plan(settings)
    if population:
        write_population(settings)
    return settings


def test_the_population_is_read_and_sent_with_each_task(make_settings) -> None:
    settings = prepared(
        make_settings, CLIENT_SPEED="slow:0.34,5", DROPOUT="0.1", DROPOUT_MODE="silent"
    )
    start = persistence.load(settings, settings.aggregation)
    assert start.population is not None
    assert [c.speed for c in start.population.clients] == [1.0, 5.0, 1.0]  # seeded: 1 of 3
    profiles = persistence.profiles(settings, start.population)
    assert profiles["client-2"] == Profile(
        speed=5.0, bandwidth=None, dropout=0.1, dropout_mode="silent", clock="real"
    )


def test_equal_clients_send_no_profile_and_need_no_file(make_settings) -> None:
    settings = prepared(make_settings, population=False)
    start = persistence.load(settings, settings.aggregation)  # a MODEL_DIR of before the file
    assert start.population is not None and start.population.uniform
    assert persistence.profiles(settings, start.population) == {}


def test_other_settings_without_the_file_say_to_run_prepare(make_settings) -> None:
    settings = prepared(make_settings, population=False, CLIENT_SPEED="2")
    with pytest.raises(StartupError, match=r"no clients.json in .*run python -m fedsim.prepare"):
        persistence.load(settings, settings.aggregation)


def test_settings_that_differ_from_the_file_are_named(make_settings) -> None:
    prepared(make_settings, CLIENT_BANDWIDTH="1e6")
    settings = make_settings(MODEL="mlp", CLIENT_BANDWIDTH="2e6")
    with pytest.raises(StartupError) as caught:
        persistence.load(settings, settings.aggregation)
    message = str(caught.value)
    assert "clients.json does not match the settings" in message
    assert "CLIENT_BANDWIDTH is 2e+06 here, 1e+06 in clients.json" in message
    assert "docker compose down -v" in message


def test_a_corrupt_file_stops_the_start_with_its_fault(make_settings) -> None:
    settings = prepared(make_settings, DROPOUT="0.3")
    path = settings.model_dir / "clients.json"
    path.write_text(path.read_text()[:-20])
    with pytest.raises(StartupError, match=rf"{path}: not JSON .*docker compose down -v"):
        persistence.load(settings, settings.aggregation)


def test_a_file_of_another_plan_is_refused(make_settings) -> None:
    settings = prepared(make_settings, DROPOUT="0.3")
    other = make_settings(MODEL="mlp", DROPOUT="0.3", CLIENT_SLICES="1-2 3-4 5-6 7-8")
    write_population(other)  # four clients
    with pytest.raises(StartupError, match="has 4 clients, the partition plan 3"):
        persistence.load(settings, settings.aggregation)


def test_the_aggregators_state_grows_by_under_200_bytes_a_client(make_settings, clock) -> None:
    """The plan (76 B a client: tasks/roster.py) and a population that is not uniform (32 B:
    speed, bandwidth, dropout, phase) in columns; no record per client until it is seen."""
    from helpers import build_app

    def held(n: int) -> int:
        folder = make_settings().model_dir.parent / f"m{n}"
        gc.collect()
        tracemalloc.start()
        try:
            app = build_app(
                make_settings, clock, MODEL_DIR=folder, PARTITION="iid", NUM_CLIENTS=n,
                CLIENTS_PER_ROUND=10, AGGREGATION="fedavg", CLIENT_SPEED="lognormal:0,0.5",
            )  # fmt: skip
            gc.collect()
            size, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert len(state_of(app).clients) == n
        return size

    held(100)  # the first app fills the caches every later one shares
    small, large = held(100), held(10_000)

    assert large - small < 200 * (10_000 - 100)


@pytest.mark.parametrize(
    ("stored", "kept"),
    [
        (
            '{"round": 3, "waiting": {"3": ["client-1", "client-4"]}, "since": ["client-2"]}',
            {"round": 3, "waiting": {"3": ["client-1", "client-4"]}, "since": ["client-2"]},
        ),
        (
            '{"round": null, "waiting": {}, "since": []}',
            {"round": None, "waiting": {}, "since": []},
        ),
        (None, {}),  # a checkpoint made before it kept them
        ("not json", {}),
        ('{"round": "3", "waiting": {}, "since": []}', {}),
        ('{"round": 1, "waiting": {"1": [1]}, "since": []}', {}),
        ('{"round": 1, "waiting": {"v1": []}, "since": []}', {}),
        ('{"round": 1, "waiting": [], "since": []}', {}),
        ('{"round": 1, "waiting": {}, "since": "client-1"}', {}),
        ('{"round": 1, "since": []}', {}),
        ("[1]", {}),
    ],
)
def test_the_clients_of_the_entries_to_come_are_read_or_dropped(stored, kept) -> None:
    meta = {} if stored is None else {"pending": stored}
    assert persistence._pending(meta, "ckpt") == kept
