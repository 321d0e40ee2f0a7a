"""An idle worker's ask waits for the next change, and only so many wait at once."""

from __future__ import annotations

import threading
import time

from fedsim.aggregator.holding import Holds, slots_for
from fedsim.protocol import Offer

NOTHING = Offer(None, reason="the round is closing", retry_after=0.5)
WORK = Offer(None, finished=True)  # any answer that ends a wait


class Queue:
    """Answers NOTHING until `ready` is set, then WORK; counts the asks."""

    def __init__(self) -> None:
        self.ready = False
        self.asks = 0

    def ask(self) -> tuple[Offer, str]:
        self.asks += 1
        return (WORK if self.ready else NOTHING), "w1"


def in_thread(holds: Holds, queue: Queue) -> tuple[threading.Thread, list]:
    answers: list = []
    thread = threading.Thread(target=lambda: answers.append(holds.ask(queue.ask)))
    thread.start()
    return thread, answers


def test_an_ask_with_work_is_answered_at_once_and_not_held():
    queue = Queue()
    queue.ready = True
    assert Holds(seconds=30).ask(queue.ask) == (WORK, "w1", False)
    assert queue.asks == 1


def test_a_held_ask_is_answered_by_the_change_that_makes_work():
    holds, queue = Holds(seconds=30), Queue()
    thread, answers = in_thread(holds, queue)
    while holds.held < 1:
        time.sleep(0.01)
    holds.changed()  # a change that makes no work: the ask looks and waits on
    while queue.asks < 2:
        time.sleep(0.01)
    assert thread.is_alive()
    queue.ready = True
    holds.changed()
    thread.join(timeout=10)
    assert answers == [(WORK, "w1", True)] and queue.asks == 3


def test_a_change_between_the_empty_answer_and_the_wait_is_not_missed():
    holds = Holds(seconds=30)

    class Racing(Queue):
        def ask(self):
            answer = super().ask()
            if self.asks == 1:  # the change lands after the answer, before any wait
                self.ready = True
                holds.changed()
            return answer

    queue = Racing()
    assert holds.ask(queue.ask) == (WORK, "w1", True)
    assert queue.asks == 2


def test_a_held_ask_ends_empty_after_its_seconds():
    now = [0.0]

    def clock() -> float:
        now[0] += 0.3  # each look at the clock: 0.3 s later
        return now[0]

    holds, queue = Holds(seconds=0.2, clock=clock), Queue()
    assert holds.ask(queue.ask) == (NOTHING, "w1", True)
    assert queue.asks == 1


def test_beyond_its_slots_an_ask_is_answered_at_once_and_a_slot_frees_when_a_hold_ends():
    holds, queue = Holds(seconds=30, slots=1), Queue()
    thread, answers = in_thread(holds, queue)
    while holds.held < 1:  # the first ask has taken the slot
        time.sleep(0.01)
    assert holds.ask(queue.ask) == (NOTHING, "w1", False)
    queue.ready = True
    holds.changed()
    thread.join(timeout=10)
    assert answers == [(WORK, "w1", True)]
    queue.ready = False
    assert holds.held == 0
    thread, answers = in_thread(holds, queue)  # the slot is free again: this one waits
    while holds.held < 1:
        time.sleep(0.01)
    queue.ready = True
    holds.changed()
    thread.join(timeout=10)
    assert answers == [(WORK, "w1", True)]


def test_half_of_the_request_threads_may_hold_asks():
    assert [slots_for(t) for t in ("8", "3", "1", None, "x")] == [4, 1, 0, 4, 4]


def test_without_seconds_nothing_is_held():
    queue = Queue()
    assert Holds(seconds=0).ask(queue.ask) == (NOTHING, "w1", False)
