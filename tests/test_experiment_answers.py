"""fedsim.experiment.answers: the watcher's polls of /v1/status and /v1/history pages, against
a fake aggregator that answers as the real one pages its history."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

from fedsim.experiment.answers import PAGE, Answers


class Aggregator:
    """Answers /v1/status and /v1/history?after=&limit= from a history it grows by hand."""

    def __init__(self) -> None:
        self.scored: dict[int, float] = {}  # version -> accuracy
        self.version = 0
        self.pending: list[int] = []
        self.asked: list[str] = []
        self.down = False

    def get(self, url: str) -> bytes | None:
        self.asked.append(url)
        if self.down:
            return None
        parts = urlsplit(url)
        if parts.path == "/v1/status":
            body = {"version": self.version, "evaluations_pending": self.pending}
            return json.dumps(body).encode()
        query = {k: int(v[0]) for k, v in parse_qs(parts.query).items()}
        after, limit = query.get("after", -1), query["limit"]
        chosen = [
            {"version": v, "accuracy": a} for v, a in sorted(self.scored.items()) if v > after
        ]
        page = {"history": chosen[:limit]}
        if len(chosen) > limit:
            page["next"] = chosen[limit - 1]["version"]
        return json.dumps(page).encode()

    def made(self, version: int, accuracy: float | None) -> None:
        """`version` published; scored now, or pending when `accuracy` is None."""
        self.version = version
        if accuracy is None:
            self.pending.append(version)
        else:
            self.scored[version] = accuracy


def test_each_poll_reads_the_status_then_only_the_versions_after_those_held():
    agg = Aggregator()
    for v in range(4):
        agg.made(v, v / 10)
    answers = Answers("http://agg/", agg.get)

    first = answers.entries()
    agg.made(4, 0.4)
    second = answers.entries()

    assert [e["version"] for e in first] == [0, 1, 2, 3]
    assert [e["version"] for e in second] == [0, 1, 2, 3, 4]
    assert agg.asked == [
        "http://agg/v1/status", f"http://agg/v1/history?limit={PAGE}",
        "http://agg/v1/status", f"http://agg/v1/history?limit={PAGE}&after=3",
    ]  # fmt: skip
    last_page = agg.get(f"http://agg/v1/history?limit={PAGE}&after=3")
    assert answers.history_bytes == len(last_page)
    assert answers.status_bytes == len(agg.get("http://agg/v1/status"))


def test_a_poll_does_not_grow_with_the_history():
    agg = Aggregator()
    answers = Answers("http://agg", agg.get)
    sizes = []
    for v in range(300):
        agg.made(v, 0.5)
        answers.entries()
        sizes.append(answers.history_bytes)

    assert len(answers.history()) == 300
    one_entry = len(json.dumps({"history": [{"version": 299, "accuracy": 0.5}]}))
    assert max(sizes) <= one_entry  # one new entry a poll, however long the run


def test_a_version_still_being_scored_is_asked_for_again_and_not_missed():
    agg = Aggregator()
    agg.made(0, 0.1)
    agg.made(1, None)  # being scored
    agg.made(2, 0.3)  # scored first
    answers = Answers("http://agg", agg.get)
    answers.entries()
    assert [e["version"] for e in answers.history()] == [0, 2]

    agg.scored[1], agg.pending = 0.2, []
    got = answers.entries()

    assert agg.asked[-1].endswith("&after=0")  # from below the pending version
    assert [(e["version"], e["accuracy"]) for e in got] == [(0, 0.1), (1, 0.2), (2, 0.3)]


def test_polls_come_no_more_often_than_asked():
    agg = Aggregator()
    agg.made(0, 0.1)
    now = [0.0]
    answers = Answers("http://agg", agg.get, every=2.0, clock=lambda: now[0])

    answers.entries()
    now[0] = 1.9
    answers.entries()
    now[0] = 2.0
    answers.entries()

    assert sum(url.endswith("/v1/status") for url in agg.asked) == 2


def test_an_aggregator_that_does_not_answer_changes_nothing_held():
    agg = Aggregator()
    agg.made(0, 0.1)
    answers = Answers("http://agg", agg.get)
    answers.poll()
    sizes = (answers.status_bytes, answers.history_bytes)

    agg.down = True
    assert answers.poll() is False

    assert [e["version"] for e in answers.history()] == [0]
    assert (answers.status_bytes, answers.history_bytes) == sizes


def test_drain_reads_page_after_page_to_the_end():
    agg = Aggregator()
    for v in range(2 * PAGE + 5):
        agg.made(v, 0.5)
    answers = Answers("http://agg", agg.get)

    answers.drain()

    assert len(answers.history()) == 2 * PAGE + 5 and not answers.more
    assert sum("/v1/history" in url for url in agg.asked) == 3


def test_a_restart_that_lost_versions_reads_the_history_again_from_the_start():
    agg = Aggregator()
    answers = Answers("http://agg", agg.get)
    for v in range(5):
        agg.made(v, 0.5)
    assert [e["version"] for e in answers.entries()] == [0, 1, 2, 3, 4]
    # The aggregator restarts from its version-2 checkpoint and makes 3 again, scored 0.7.
    agg.version, agg.scored = 2, {v: agg.scored[v] for v in (0, 1, 2)}
    answers.poll()
    assert answers.history() == [] and answers.cursor is None
    agg.made(3, 0.7)
    assert [(e["version"], e["accuracy"]) for e in answers.entries()] == [
        (0, 0.5), (1, 0.5), (2, 0.5), (3, 0.7)
    ]  # fmt: skip
