"""The task queue: the aggregator decides which logical client trains what, and when to score.

A worker asks for work and gets a task with a lease; it finishes the task within
TASK_TIMEOUT or the task goes to another worker, and a result under the old
lease is refused. ids.py names the work (task ids, seeds), leases.py tracks
workers and leases, queues.py is the queue, asynchronous.py and rounds.py hold
its three plans, and secagg.py the round plan under SECAGG=true (secure
aggregation's phases as tasks).
"""

from fedsim.aggregator.tasks.asynchronous import SampledQueue, SliceQueue
from fedsim.aggregator.tasks.ids import Client, choose_attackers, sample, task_seed
from fedsim.aggregator.tasks.leases import (
    MAX_WORKERS,
    WORKER_LIVE_SECONDS,
    Lease,
    Worker,
    lease_key,
)
from fedsim.aggregator.tasks.queues import Queue
from fedsim.aggregator.tasks.rounds import RETRY, Round, RoundQueue
from fedsim.protocol import Offer

__all__ = [
    "MAX_WORKERS",
    "RETRY",
    "WORKER_LIVE_SECONDS",
    "Client",
    "Lease",
    "Offer",
    "Queue",
    "Round",
    "RoundQueue",
    "SampledQueue",
    "SliceQueue",
    "Worker",
    "choose_attackers",
    "lease_key",
    "sample",
    "task_seed",
]
