"""The task queue without HTTP: task ids and seeds, workers and leases, the three plans."""

from __future__ import annotations

import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedsim.aggregator import tasks
from fedsim.aggregator.strategies import Refused
from fedsim.aggregator.tasks import ids
from fedsim.protocol import EvalTask, TrainSettings, TrainTask
from helpers import FakeClock

TRAINING = {"model": "mlp", "epochs": 1, "batch_size": 10, "learning_rate": 0.1, "optimizer": "sgd"}
PLAN = {"PARTITION": "iid", "SEED": 7, "NUM_CLIENTS": 4}


def queue(kind: type[tasks.Queue], clients, clock: FakeClock | None = None, **kw) -> tasks.Queue:
    clock = clock or FakeClock()
    common = {
        "seed": 7,
        "per_round": 2,
        "rounds": 3,
        "task_timeout": 30.0,
        "training": TRAINING,
        "partition": PLAN,
        "clock": clock,
        "run_clock": clock,  # the run's clock reads the fake one as it is
        "wall": lambda: 1.7e9,
    }
    return kind(clients, **{**common, **kw})


def sliced(n: int = 2, per: int = 2) -> list[tasks.Client]:
    """n clients of `per` slices each, 1-based ranges in order, 5,000 images a slice."""
    return [
        tasks.Client(c, 5000 * per, f"h{c}", (per * (c - 1) + 1, per * c)) for c in range(1, n + 1)
    ]


def plain(n: int = 4) -> list[tasks.Client]:
    return [tasks.Client(c, 100 * c, f"h{c}") for c in range(1, n + 1)]


def signed(q: tasks.Queue, task_id: str) -> str:
    """A lease of `task_id` as the queue signs them, never handed out."""
    nonce = "0" * 24
    return nonce + q._sign(task_id, nonce)


def take(q: tasks.Queue, uid: str = "host-1-aa", version: int = 0) -> TrainTask | EvalTask:
    offer, _ = q.ask(uid, version)
    assert offer.task is not None, offer
    return offer.task


# --- ids and seeds ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task_id", "parsed"),
    [
        ("c2.s5", (ids.parse_slice, (2, 5))),
        ("u42.c17", (ids.parse_update, (42, 17))),
        ("r3.c17", (ids.parse_round, (3, 17))),
        ("r3a2.c17", (ids.parse_round, (3, 17))),
        ("eval.v12", (ids.parse_eval, 12)),
        ("eval.v0", (ids.parse_eval, 0)),
    ],
)
def test_each_kind_of_task_id_parses_to_its_numbers_and_no_other(task_id, parsed) -> None:
    parse, expected = parsed
    assert ids.is_task(task_id) and parse(task_id) == expected
    others = {ids.parse_slice, ids.parse_update, ids.parse_round, ids.parse_eval} - {parse}
    assert all(other(task_id) is None for other in others)


@pytest.mark.parametrize(
    "task_id", ["c02.s5", "c2.s5\n", "r1.c1 ", "u1.c٣", "eval.v-1", "eval.12", "x1.c2", "", "r1"]
)
def test_a_task_id_has_one_spelling(task_id: str) -> None:
    assert not ids.is_task(task_id)
    assert ids.parse_slice(task_id) is ids.parse_round(task_id) is ids.parse_eval(task_id) is None


@given(st.integers(0, 10**12), st.integers(0, 10**12))
def test_formatted_ids_parse_back(a: int, b: int) -> None:
    assert ids.parse_slice(ids.slice_task(a, b)) == (a, b)
    assert ids.parse_update(ids.update_task(a, b)) == (a, b)
    assert ids.parse_round(ids.round_task(a, b)) == (a, b)
    assert ids.parse_eval(ids.eval_task(a)) == a


@given(st.text(alphabet="cusrevl.0123456789", max_size=12))
def test_any_text_that_parses_is_the_one_spelling_of_its_numbers(text: str) -> None:
    for parse, make in (
        (ids.parse_slice, ids.slice_task),
        (ids.parse_update, ids.update_task),
        (ids.parse_round, ids.round_task),
    ):
        pair = parse(text)
        if pair is not None:
            assert make(*pair) == text
    version = ids.parse_eval(text)
    if version is not None:
        assert ids.eval_task(version) == text


def test_a_rounds_sample_depends_on_the_seed_and_round_only() -> None:
    first = tasks.sample(42, 1, 5, 20)
    assert first == tasks.sample(42, 1, 5, 20) == sorted(set(first))
    assert len(first) == 5 and all(1 <= n <= 20 for n in first)
    assert first != tasks.sample(42, 2, 5, 20) or first != tasks.sample(43, 1, 5, 20)


def test_attackers_are_seeded_and_none_for_zero() -> None:
    assert tasks.choose_attackers(42, 0, 10) == []
    chosen = tasks.choose_attackers(42, 3, 10)
    assert chosen == tasks.choose_attackers(42, 3, 10) and len(set(chosen)) == 3


def test_a_task_seed_is_31_bits_of_sha256_of_seed_and_id() -> None:
    assert tasks.task_seed(42, "r1.c2") == tasks.task_seed(42, "r1.c2")
    assert tasks.task_seed(42, "r1.c2") != tasks.task_seed(42, "r1.c3")
    assert 0 <= tasks.task_seed(1, "c1.s1") < 2**31


@pytest.mark.parametrize(
    ("numbers", "text"), [([], ""), ([3], "3"), ([1, 2, 3, 5], "1-3,5"), ([7, 1, 2], "1-2,7")]
)
def test_ranges_round_trip(numbers: list[int], text: str) -> None:
    assert ids.ranges(numbers) == text
    assert ids.unranges(text, 100) == set(numbers)


def test_unranges_clamps_at_the_limit() -> None:
    assert ids.unranges("1-3,8-20", 10) == {1, 2, 3, 8, 9, 10}


# --- workers and leases -------------------------------------------------------------------


def test_workers_are_named_in_order_of_first_contact_and_counted_while_heard_from() -> None:
    clock = FakeClock()
    q = queue(tasks.SampledQueue, plain())
    assert q.worker("a", clock()).name == "w1" and q.worker("b", clock()).name == "w2"
    assert q.worker("a", clock()).name == "w1"
    assert q.live_workers(clock()) == 2
    assert q.live_workers(clock() + tasks.WORKER_LIVE_SECONDS) == 0


def test_the_worker_registry_forgets_the_least_recently_seen(monkeypatch) -> None:
    from fedsim.aggregator.tasks import leases

    monkeypatch.setattr(leases, "MAX_WORKERS", 2)
    q = queue(tasks.SampledQueue, plain())
    for uid in ("a", "b", "a", "c"):
        q.worker(uid, 0.0)
    assert list(q.workers) == ["a", "c"]


def test_a_lease_runs_out_after_the_task_timeout_and_the_task_goes_to_another_worker() -> None:
    clock = FakeClock()
    q = queue(tasks.SampledQueue, plain(), clock)
    first = take(q, "a")
    clock.advance(29.9)
    assert take(q, "b").id != first.id  # still leased to a
    clock.advance(0.1)
    again = take(q, "c")
    assert again.id == first.id and again.lease != first.lease and again.worker == "w3"
    assert q.drain_expired() == [(first.id, "w1")] and q.drain_expired() == []
    # The first lease is not the task's any more: its result is refused.
    with pytest.raises(Refused) as refused:
        q.check_update(first.id, first.lease, first.client, 0, 0, 1)
    assert refused.value.code == "reassigned" and "TASK_TIMEOUT=30s" in refused.value.reason


def test_a_result_under_the_current_lease_frees_the_worker_and_counts_for_it() -> None:
    q = queue(tasks.SampledQueue, plain())
    task = take(q, "a")
    assert q.workers["a"].task == task.id
    assert q.check_update(task.id, task.lease, task.client, 0, 0, 1) is True
    q.record_update(task.id, task.lease)
    record = q.workers["a"]
    assert (record.task, record.tasks_done, q.leases) == (None, 1, {})
    # The same result again under its lease is acknowledged as counted; under a lease
    # never handed out with the task it is refused, never taken for a repeat.
    assert q.check_update(task.id, task.lease, task.client, 0, 0, 1) is False
    with pytest.raises(Refused) as forged:
        q.check_update(task.id, "beef", task.client, 0, 0, 1)
    assert forged.value.code == "not_leased" and task.id in forged.value.reason


def test_a_lease_is_the_tasks_alone_and_unguessable_from_its_id() -> None:
    q = queue(tasks.SampledQueue, plain())
    one, two = take(q, "a"), take(q, "b")
    assert one.lease != two.lease and len(one.lease) == 64
    assert q.genuine(one.id, one.lease) and q.genuine(two.id, two.lease)
    assert not q.genuine(two.id, one.lease)  # another task's lease
    assert not q.genuine(one.id, one.lease[:24] + two.lease[24:])  # its nonce, another's MAC
    with pytest.raises(Refused) as refused:
        q.check_update(two.id, one.lease, two.client, 0, 0, 1)
    assert refused.value.code == "not_leased"
    assert q.leases[two.id].token == two.lease  # a refused claim took nothing from its holder


def test_leases_are_recognised_after_a_restart_through_the_key_file(tmp_path) -> None:
    # Prepare: a lease handed out under the key in MODEL_DIR.
    key = tasks.lease_key(tmp_path)
    assert stat.S_IMODE((tmp_path / "leases.key").stat().st_mode) == 0o600
    task = take(queue(tasks.SampledQueue, plain(), key=key), "a")
    # Act: a new queue, as after a restart, reads the same key back.
    again = queue(tasks.SampledQueue, plain(), key=tasks.lease_key(tmp_path))
    # Assert: the worker's result counts there; under another key it does not.
    assert again.check_update(task.id, task.lease, task.client, 0, 0, 1) is True
    with pytest.raises(Refused) as refused:
        queue(tasks.SampledQueue, plain()).check_update(task.id, task.lease, task.client, 0, 0, 1)
    assert refused.value.code == "not_leased"


def test_every_task_carries_the_runs_id_the_same_after_a_restart(tmp_path) -> None:
    key = tasks.lease_key(tmp_path)
    first = take(queue(tasks.SampledQueue, plain(), key=key), "a")
    again = take(queue(tasks.SampledQueue, plain(), key=tasks.lease_key(tmp_path)), "a")
    other = take(queue(tasks.SampledQueue, plain()), "a")  # a new run: another key
    assert first.run == again.run and len(first.run) == 16 and first.run not in key.hex()
    assert other.run != first.run


def test_a_broken_key_file_is_replaced(tmp_path) -> None:
    (tmp_path / "leases.key").write_text("not hex\n")
    key = tasks.lease_key(tmp_path)
    assert len(key) == 32 and (tmp_path / "leases.key").read_text() == key.hex() + "\n"
    assert tasks.lease_key(tmp_path) == key


def test_the_status_lists_workers_and_leases() -> None:
    q = queue(tasks.SampledQueue, plain())
    task = take(q, "a")
    q.ask("b", 0, retries=3)
    status = q.status()
    assert status["tasks_leased"] == 2 and status["evaluations_pending"] == []
    a, b = status["workers"]
    assert (a["id"], a["task"], a["client"]) == ("w1", task.id, task.client)
    assert b["retries"] == 3 and a["last_seen"] == "2023-11-14T22:13:20+00:00"


# --- tasks: what a task holds -------------------------------------------------------------


def test_a_train_task_carries_the_settings_the_plan_and_its_seed() -> None:
    q = queue(tasks.SampledQueue, plain())
    task = take(q, "a", version=5)
    assert isinstance(task, TrainTask)
    assert task.train == TrainSettings.from_json(TRAINING) and task.partition == PLAN
    assert (task.base_version, task.round, task.slice, task.attack) == (5, None, None, None)
    assert task.seed == tasks.task_seed(7, task.id) and task.timeout == 30.0
    assert task.samples == q.clients[task.client_number].samples


def test_only_the_attackers_tasks_carry_the_attack_with_the_tasks_seed() -> None:
    q = queue(
        tasks.RoundQueue,
        plain(),
        quorum=2,
        per_round=4,
        attack={"kind": "scaled", "scale": 10.0},
        attackers=[2],
    )
    given_out = [take(q, f"w{i}") for i in range(4)]
    attacked = [t for t in given_out if t.attack is not None]
    assert [t.client for t in attacked] == ["client-2"]
    assert (attacked[0].attack.kind, attacked[0].attack.scale) == ("scaled", 10.0)
    assert attacked[0].attack.seed == attacked[0].seed


def test_evaluations_go_first_and_are_checked_against_their_lease() -> None:
    q = queue(tasks.SampledQueue, plain())
    q.want_evaluation(3)
    q.want_evaluation(3)
    task = take(q, "a")
    assert isinstance(task, EvalTask) and (task.id, task.version) == ("eval.v3", 3)
    assert q.workers["a"].client is None
    with pytest.raises(Refused, match=r"this lease was not handed out with task eval\.v3"):
        q.check_evaluation(task.id, "0")
    with pytest.raises(Refused) as unknown:
        q.check_evaluation("r1.c1", task.lease)
    assert unknown.value.code == "unknown_task"
    assert q.check_evaluation(task.id, task.lease) == 3
    q.record_evaluation(task.id, task.lease, 3)
    assert q.evals == []
    with pytest.raises(Refused) as done:
        q.check_evaluation(task.id, task.lease)
    assert done.value.code == "task_done"


def test_waiting_evaluations_beyond_the_bound_are_dropped_oldest_first_unless_leased() -> None:
    q = queue(tasks.SampledQueue, plain())
    for version in (1, 2, 3, 4):
        q.want_evaluation(version)
    take(q, "a")  # leases eval.v1
    assert q.drop_evaluations(keep=2) == [2, 3] and q.evals == [1, 4]


def test_an_update_for_a_task_not_of_this_run_is_refused() -> None:
    q = queue(tasks.SampledQueue, plain())
    not_first = next(n for n in range(1, 5) if n != q.client_number(1))
    for task_id in (ids.update_task(1, not_first), "u99.c1", "eval.v0", "r1.c1", "nonsense"):
        with pytest.raises(Refused) as refused:
            q.check_update(task_id, "ab", "client-1", 0, 0, 1)
        assert refused.value.code == "unknown_task", task_id


def test_an_update_for_another_client_or_more_samples_than_held_is_refused() -> None:
    q = queue(tasks.SampledQueue, plain())
    task = take(q, "a")
    with pytest.raises(Refused) as wrong:
        q.check_update(task.id, task.lease, "client-99", 0, 0, 1)
    assert wrong.value.code == "wrong_client"
    with pytest.raises(Refused) as many:
        q.check_update(task.id, task.lease, task.client, 0, 0, task.samples + 1)
    assert (many.value.code, many.value.status) == ("bad_num_samples", 422)


# --- slices: each client's slices in order, with affinity ----------------------------------


def test_slices_are_trained_in_order_each_client_keeping_its_worker() -> None:
    q = queue(tasks.SliceQueue, sliced())
    a, b = take(q, "hostA-1-aa"), take(q, "hostB-1-bb")
    assert (a.id, a.slice, a.slices, a.samples) == ("c1.s1", 1, "1-2", 5000)
    assert (b.id, b.slice, b.slices) == ("c2.s3", 3, "3-4")
    q.record_update(a.id, a.lease)
    assert take(q, "hostA-1-aa").id == "c1.s2"  # its own client's next slice
    # An update for a later slice before the current one is out of order.
    with pytest.raises(Refused) as early:
        q.check_update("c2.s4", signed(q, "c2.s4"), "client-2", 0, 0, 1)
    assert early.value.code == "out_of_order" and "slice 3 comes next" in early.value.reason


def test_slices_progress_is_saved_and_restored_within_bounds() -> None:
    q = queue(tasks.SliceQueue, sliced())
    task = take(q)
    q.record_update(task.id, task.lease)
    assert q.state_dict() == {"slices_done": {"1": 1, "2": 0}}
    again = queue(tasks.SliceQueue, sliced())
    again.load_state_dict({"slices_done": {"1": 1, "2": 99, "7": 1}})
    assert again.done == {1: 1, 2: 2}
    assert again.is_done("c1.s1") and not again.is_done("c1.s2") and again.is_done("c2.s4")


def test_a_worker_that_had_work_stays_to_take_over_from_one_that_dies() -> None:
    clock = FakeClock(0.0)
    q = queue(tasks.SliceQueue, [tasks.Client(1, 10, "x", (1, 2))], clock, task_timeout=60)
    assert take(q, "hostA-1-aa").id == "c1.s1"
    # A second host never had work while A trains: it may leave.
    assert q.ask("hostB-2-bb", 0)[0].surplus
    # A is killed and its container comes back under a new id: it waits, and takes the
    # slice over once the dead lease runs out.
    reborn, _ = q.ask("hostA-7-cc", 0)
    assert reborn.task is None and not reborn.surplus
    clock.now = 61
    assert take(q, "hostA-7-cc").id == "c1.s1"


def test_a_finished_slice_run_says_so_once_the_last_version_is_scored() -> None:
    q = queue(tasks.SliceQueue, [tasks.Client(1, 10, "x", (1, 1))])
    task = take(q)
    q.record_update(task.id, task.lease)
    q.want_evaluation(1)
    waiting, _ = q.ask("other-1-aa", 1)
    assert waiting.task is not None and not q.finished
    q.record_evaluation(waiting.task.id, waiting.task.lease, 1)
    offer, _ = q.ask("other-1-aa", 1)
    assert offer.finished and q.finished


# --- sampled: ROUNDS x C updates by the rounds' samples ------------------------------------


def test_sampled_updates_follow_the_rounds_samples_and_end_after_rounds_times_c() -> None:
    q = queue(tasks.SampledQueue, plain(), rounds=2, per_round=2)
    expected = [
        f"u{n}.c{c}" for n, c in enumerate(tasks.sample(7, 1, 2, 4) + tasks.sample(7, 2, 2, 4), 1)
    ]
    given_out = []
    for _ in range(4):
        task = take(q)
        q.record_update(task.id, task.lease)
        given_out.append(task.id)
    assert given_out == expected and q.training_done
    assert q.state_dict() == {"updates_done": "1-4"}
    again = queue(tasks.SampledQueue, plain(), rounds=2, per_round=2)
    again.load_state_dict({"updates_done": "1-2,4-9"})
    assert again.done_numbers == {1, 2, 4} and take(again).id == expected[2]


# --- rounds: C sampled clients, closed when all are in or at the deadline -------------------
# (over-selection, retries and resume: test_rounds.py)


def rounds(clock: FakeClock | None = None, clients=None, **kw) -> tasks.RoundQueue:
    kw = {"quorum": 3, "deadline": 60.0, "per_round": 3, **kw}
    return queue(tasks.RoundQueue, clients or plain(), clock, **kw)


def test_a_round_hands_out_its_sample_on_the_version_it_opened_at() -> None:
    q = rounds()
    given_out = [take(q, f"w{i}", version=4) for i in range(3)]
    assert [t.client_number for t in given_out] == tasks.sample(7, 1, 3, 4)
    assert {t.round for t in given_out} == {1} and {t.base_version for t in given_out} == {4}
    offer, _ = q.ask("w9", 4)
    assert offer.task is None and offer.reason == "waiting for round 1 to close"


def test_a_round_closes_when_all_are_in_or_at_its_deadline_with_a_quorum() -> None:
    clock = FakeClock()
    q = rounds(clock, quorum=2)
    a, b, c = (take(q, f"w{i}") for i in range(3))
    assert q.due(clock()) is None and q.deadline() == clock() + 60.0
    q.add_update(a.id, "update-a", clock())
    q.add_update(b.id, "update-b", clock())
    assert q.due(clock()) is None  # a quorum closes a round only at its deadline
    clock.advance(60)
    assert q.due(clock()) == "deadline"
    q.add_update(c.id, "update-c", clock())
    assert q.due(clock()) == "all sampled clients"
    closed = q.close("all sampled clients")
    assert closed.number == 1 and len(closed.updates) == 3
    assert (q.rounds_done, q.round, q.leases) == (1, None, {})
    assert all(w.task is None for w in q.workers.values())


def test_a_closed_rounds_update_is_stale_and_a_finished_runs_is_refused() -> None:
    q = rounds(rounds=1)
    task = take(q, "a")
    q.add_update(task.id, "u", 0.0)
    assert q.check_update(task.id, task.lease, task.client, 0, 0, 1) is False  # in the round
    late = take(q, "b")
    q.close()
    with pytest.raises(Refused) as finished:
        q.check_update(late.id, late.lease, late.client, 0, 1, 1)
    assert finished.value.code == "finished" and finished.value.finished
    assert q.training_done and q.ask("c", 1)[0].reason == "evaluating the last version"


def test_an_update_for_another_round_or_base_is_stale() -> None:
    q = rounds(rounds=2)
    task = take(q, "a", version=0)
    with pytest.raises(Refused) as stale:
        q.check_update(task.id, task.lease, task.client, 3, 3, 1)
    assert stale.value.code == "stale" and "round 1 collects updates to version 0" in str(
        stale.value
    )
    with pytest.raises(Refused) as unsampled:
        other = next(n for n in range(1, 5) if n not in tasks.sample(7, 1, 3, 4))
        q.check_update(ids.round_task(1, other), "ab", f"client-{other}", 0, 0, 1)
    assert unsampled.value.code == "unknown_task"


def test_under_slices_a_client_trains_its_slices_in_turn_round_by_round() -> None:
    q = rounds(clients=sliced(2, per=2), per_round=2, quorum=2)
    for round_no, slices in ((1, {1, 3}), (2, {2, 4}), (3, {1, 3})):
        given_out = [take(q, f"w{i}", version=round_no - 1) for i in range(2)]
        assert {t.slice for t in given_out} == slices and {t.samples for t in given_out} == {5000}
        for t in given_out:
            q.add_update(t.id, t.id, 0.0)
        assert q.close().number == round_no


def test_round_progress_is_saved_and_a_bad_count_refused() -> None:
    q = rounds()
    assert q.state_dict() == {"rounds_done": 0, "arrivals": []}
    q.load_state_dict({"rounds_done": 99})
    assert q.rounds_done == 3 and q.finished
    with pytest.raises(ValueError, match="bad rounds_done"):
        q.load_state_dict({"rounds_done": -1})


def test_the_round_status_shows_the_sample_and_when_it_closes() -> None:
    clock = FakeClock()
    q = rounds(clock)
    task = take(q, "a")
    clock.advance(10)
    q.add_update(task.id, "u", clock())
    shown = q.status()["round"]
    assert shown["number"] == 1 and shown["pending"] == 1 and shown["clients"] == [task.client]
    assert shown["sampled"] == [f"client-{n}" for n in tasks.sample(7, 1, 3, 4)]
    assert shown["closes_in"] == 50.0 and shown["finished"] is False
