"""The population model: seeded speeds, bandwidths, dropouts, availability, clients.json."""

from __future__ import annotations

import gc
import json
import math
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from fedsim.data import population_file
from fedsim.data.population import DAY, FILE, Population, PopulationError, read_trace


def ids(n: int) -> list[str]:
    return [f"client-{i}" for i in range(1, n + 1)]


def build(n: int = 20, seed: int = 42, **keys: object) -> Population:
    return Population.build({"SEED": seed, **keys}, ids(n))


# --- draws -------------------------------------------------------------------------------


def test_the_defaults_are_everyone_equal_always_there_never_failing() -> None:
    pop = build(5)
    assert pop.uniform
    assert all(c.speed == 1 and math.isinf(c.bandwidth) and c.dropout == 0 for c in pop.clients)
    assert pop.duration("client-3", 600, 5, 1e6, 1e6, 0.001) == pytest.approx(3.0)
    assert pop.online("client-3", 1e9) and not pop.drops("client-3", 12345)


def test_the_same_seed_gives_the_same_population_and_another_seed_another() -> None:
    keys = {"CLIENT_SPEED": "lognormal:0,1", "CLIENT_BANDWIDTH": "uniform:1e5,1e6"}
    keys["AVAILABILITY"] = "diurnal"
    assert build(50, **keys) == build(50, **keys)
    assert build(50, **keys).clients != build(50, seed=7, **keys).clients


def test_attributes_draw_from_their_own_streams() -> None:
    """Changing how bandwidth is spread leaves the speeds as they were."""
    a = build(30, CLIENT_SPEED="uniform:1,5")
    b = build(30, CLIENT_SPEED="uniform:1,5", CLIENT_BANDWIDTH="lognormal:13,1")
    assert [c.speed for c in a.clients] == [c.speed for c in b.clients]


def test_lognormal_speeds_have_the_asked_mean_and_spread() -> None:
    mu, sigma = 0.3, 0.5
    speeds = np.array(
        [c.speed for c in build(10_000, CLIENT_SPEED=f"lognormal:{mu},{sigma}").clients]
    )
    mean = math.exp(mu + sigma**2 / 2)
    sd = math.sqrt((math.exp(sigma**2) - 1) * math.exp(2 * mu + sigma**2))
    assert speeds.mean() == pytest.approx(mean, rel=0.02)
    assert speeds.std() == pytest.approx(sd, rel=0.05)
    assert np.log(speeds).mean() == pytest.approx(mu, abs=0.02)


def test_uniform_bandwidths_lie_in_range_with_the_asked_mean() -> None:
    rates = np.array(
        [c.bandwidth for c in build(10_000, CLIENT_BANDWIDTH="uniform:1e5,3e5").clients]
    )
    assert rates.min() >= 1e5 and rates.max() <= 3e5
    assert rates.mean() == pytest.approx(2e5, rel=0.01)
    assert rates.std() == pytest.approx(2e5 / math.sqrt(12), rel=0.03)


def test_slow_makes_exactly_the_fraction_slower() -> None:
    speeds = [c.speed for c in build(1000, CLIENT_SPEED="slow:0.1,10").clients]
    assert sorted(set(speeds)) == [1.0, 10.0] and speeds.count(10.0) == 100
    rates = [c.bandwidth for c in build(1000, CLIENT_BANDWIDTH="slow:0.25,4,1e6").clients]
    assert rates.count(2.5e5) == 250 and rates.count(1e6) == 750


def test_duration_is_compute_times_speed_plus_bytes_over_bandwidth() -> None:
    pop = build(10, CLIENT_SPEED="2", CLIENT_BANDWIDTH="1000")
    # 100 samples x 3 epochs x 0.01 s x speed 2 = 6 s; (4000 + 1000) bytes / 1000 = 5 s
    assert pop.duration("client-1", 100, 3, 4000, 1000, 0.01) == pytest.approx(11.0)
    assert pop.compute_seconds("client-1", 100, 3, 0.01) == pytest.approx(6.0)
    assert pop.network_seconds("client-1", 5000) == pytest.approx(5.0)
    with pytest.raises(PopulationError, match="not a logical client"):
        pop.duration("client-11", 1, 1, 0, 0, 1)


def test_drops_repeat_for_a_task_and_happen_at_the_asked_rate() -> None:
    pop = build(3, DROPOUT=0.2)
    first = [pop.drops("client-1", seed) for seed in range(5000)]
    assert first == [pop.drops("client-2", seed) for seed in range(5000)]  # the task decides
    assert sum(first) / 5000 == pytest.approx(0.2, abs=0.02)
    dropped = first.index(True)
    attempts = [pop.drops("client-1", dropped, attempt) for attempt in range(50)]
    assert not all(attempts), "a task given again is a new attempt, which may succeed"


def test_dropout_must_be_a_probability_below_one() -> None:
    with pytest.raises(PopulationError, match=r"DROPOUT is 1.0, not a probability in \[0, 1\)"):
        build(3, DROPOUT=1)


# --- availability ------------------------------------------------------------------------


def test_diurnal_clients_are_online_their_fraction_of_each_day_from_their_phase() -> None:
    pop = build(2000, AVAILABILITY="diurnal:0.25")
    c = pop.clients[0]
    assert c.phase is not None and 0 <= c.phase < DAY
    assert pop.online(c, c.phase) and pop.online(c, c.phase + 0.25 * DAY - 1)
    assert not pop.online(c, c.phase + 0.25 * DAY) and pop.online(c, c.phase + DAY)
    share = np.mean([pop.online(x, 12_345.0) for x in pop.clients])
    assert share == pytest.approx(0.25, abs=0.03)  # phases spread over the day


def test_trace_windows_decide_who_is_online(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("client,start,end\nclient-1,0,100\n# later\n1,200,300\n\n3,50,60\n")
    pop = build(3, AVAILABILITY=f"trace:{trace}")
    assert pop.clients[0].windows == ((0.0, 100.0), (200.0, 300.0))
    assert [pop.online("client-1", t) for t in (0, 99.9, 100, 150, 250, 300)] == [
        True, True, False, False, True, False,
    ]  # fmt: skip
    assert not pop.online("client-2", 50)  # no window: never online
    assert pop.online("client-3", 55)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("client-1,0,10\nclient-9,0,10\n", "line 2: 'client-9' is not one of the 3 logical"),
        ("client-1,0\n", "line 1: 2 fields, expected client,start,end"),
        ("client-1,zero,10\n", "line 1: start and end must be numbers"),
        ("client-1,10,5\n", "line 1: needs 0 <= start < end"),
        ("client-1,-1,5\n", "line 1: needs 0 <= start < end"),
        ("client-1,0,inf\n", "line 1: needs 0 <= start < end"),
        ("2,0,10\n#\n2,5,20\n", "line 3: client-2's window overlaps line 1's"),
        ("client,start,end\n", "no windows"),
    ],
)
def test_bad_traces_are_refused_with_their_line(tmp_path: Path, text: str, message: str) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text(text)
    with pytest.raises(PopulationError, match=message):
        read_trace(trace, ids(3))


def test_a_missing_trace_is_named(tmp_path: Path) -> None:
    with pytest.raises(PopulationError, match=r"nope\.csv: cannot be read"):
        build(3, AVAILABILITY=f"trace:{tmp_path / 'nope.csv'}")


# --- clients.json ------------------------------------------------------------------------


def test_clients_json_is_written_read_and_equal(tmp_path: Path) -> None:
    pop = build(
        40, CLIENT_SPEED="lognormal:0,1", CLIENT_BANDWIDTH="slow:0.5,2,1e6", DROPOUT=0.1,
        AVAILABILITY="diurnal",
    )  # fmt: skip
    path = population_file.write(tmp_path, pop)
    assert path == tmp_path / FILE and len(path.read_text().splitlines()) == 42  # 1 per client
    assert population_file.read(tmp_path) == pop
    plain = build(3)
    population_file.write(tmp_path, plain)
    assert json.loads((tmp_path / FILE).read_text())["clients"][0]["bandwidth"] is None  # inf
    assert population_file.read(tmp_path) == plain


def test_differences_name_each_setting_that_changed(tmp_path: Path) -> None:
    pop = build(3, CLIENT_SPEED="uniform:1,2")
    here = {"SEED": 42, "CLIENT_SPEED": "uniform:1,3", "DROPOUT": 0.1}
    assert population_file.differences(pop, here) == [
        f"CLIENT_SPEED is uniform:1,3 here, uniform:1,2 in {FILE}",
        f"DROPOUT is 0.1 here, 0.0 in {FILE}",
    ]
    assert population_file.differences(pop, {"SEED": 42, "CLIENT_SPEED": "uniform:1,2"}) == []


def test_clients_must_be_the_plans() -> None:
    population_file.check_clients(build(3), ids(3))
    with pytest.raises(PopulationError, match="has 3 clients, the partition plan 4"):
        population_file.check_clients(build(3), ids(4))


def test_a_missing_file_says_to_run_prepare(tmp_path: Path) -> None:
    with pytest.raises(PopulationError, match=f"no {FILE} in .*run python -m fedsim.prepare"):
        population_file.read(tmp_path)


def _edited(tmp_path: Path, edit) -> str:
    population_file.write(tmp_path, build(3, AVAILABILITY="diurnal"))
    content = json.loads((tmp_path / FILE).read_text())
    edit(content)
    (tmp_path / FILE).write_text(json.dumps(content))
    with pytest.raises(PopulationError) as caught:
        population_file.read(tmp_path)
    assert str(caught.value).startswith(str(tmp_path / FILE) + ": ")
    return str(caught.value)


def _rehash(content: dict) -> None:
    from fedsim.data.population import _digest

    content["sha256"] = _digest({k: content[k] for k in ("availability", "clients")})


def test_an_edited_file_is_refused_by_its_hash(tmp_path: Path) -> None:
    message = _edited(tmp_path, lambda c: c["clients"][1].update(speed=0.5))
    assert "does not match its sha256" in message and "changed or damaged" in message


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(format=2), "format is 2, expected 1"),
        (lambda c: c["settings"].pop("DROPOUT"), "settings must have exactly the keys"),
        (lambda c: (c["clients"][0].update(speed=-1), _rehash(c)), r"clients\[0\] speed is -1"),
        (lambda c: (c["clients"][2].update(id="x"), _rehash(c)), r"clients\[2\] id is 'x'"),
        (lambda c: (c["clients"][0].update(dropout=1), _rehash(c)), r"dropout is 1, not in"),
        (lambda c: (c["clients"][1].pop("phase"), _rehash(c)), r"clients\[1\] must have exactly"),
        (lambda c: (c["clients"][0].update(phase=DAY), _rehash(c)), r"phase is 86400.0, not in"),
        (lambda c: (c["clients"][0].update(bandwidth=0), _rehash(c)), "bandwidth is 0, not a"),
        (lambda c: (c.update(clients=[]), _rehash(c)), "clients is not a non-empty list"),
        (lambda c: (c["availability"].update(mode="x"), _rehash(c)), "availability mode is 'x'"),
    ],
)
def test_a_corrupt_file_is_refused_with_the_fault(tmp_path: Path, edit, message: str) -> None:

    assert re.search(message, _edited(tmp_path, edit))


@pytest.mark.parametrize("text", ["", "{not json", "[1, 2]", "\udcff"])
def test_an_unreadable_file_is_refused(tmp_path: Path, text: str) -> None:
    (tmp_path / FILE).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(
        PopulationError, match=rf"{FILE}: (not JSON|not a JSON object|cannot be read)"
    ):
        population_file.read(tmp_path)


# --- held as columns -----------------------------------------------------------------------


def test_10000_clients_are_held_in_four_floats_each() -> None:
    gc.collect()
    tracemalloc.start()
    try:
        pop = build(10_000, CLIENT_SPEED="lognormal:0,0.5", AVAILABILITY="diurnal")
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # speed, bandwidth, dropout and phase: 4 x 8 B a client, where a profile took ~250 B.
    assert held < 10_000 * 4 * 8 + 64_000
    c = pop.client("client-10000")
    assert c.id == "client-10000" and c.speed == pop.clients[-1].speed and c.phase is not None


@pytest.mark.parametrize("name", ["client-0", "client-21", "client-01", "client-", "typed", 3])
def test_a_client_outside_the_population_is_named(name: object) -> None:
    with pytest.raises(PopulationError, match="is not a logical client of this population"):
        build(20).client(name)  # type: ignore[arg-type]


def test_a_population_is_of_the_plans_clients_in_order() -> None:
    with pytest.raises(PopulationError, match="client 2 is 'client-3': a population's clients"):
        Population.build({"SEED": 1}, ["client-1", "client-3"])
