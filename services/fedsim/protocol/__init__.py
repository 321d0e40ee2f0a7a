"""The messages between aggregator and worker: typed records, their JSON and their checks.

Both sides build and read these records; no other module makes or reads the dicts.
What travels: the answer to a request for work (`Offer`, holding a `TrainTask` or
an `EvalTask`) and an evaluation report (`Evaluation`) as JSON bodies, and an
update's metadata (`UpdateMeta`) as the string header of its safetensors body.
The JSON is the one earlier versions wrote, so a worker or a hand-started client
of an earlier version still speaks with this aggregator.

`from_json` is the one place a message is judged: it raises `Invalid`, whose
`code` is the short word and `status` the HTTP status the aggregator answers with.
No Flask, numpy or TensorFlow here: the worker and the aggregator both import it.

base.py holds the refusal, the id grammar and typed JSON fields; tasks.py what a
worker is given; reports.py what it sends.
"""

from fedsim.protocol.base import Invalid, client_id, client_number, digits, valid_id
from fedsim.protocol.reports import Ask, Dropout, Evaluation, UpdateMeta, worker_id
from fedsim.protocol.tasks import (
    Attack,
    EvalTask,
    Offer,
    Profile,
    Task,
    TrainSettings,
    TrainTask,
    task_from_json,
)

__all__ = [
    "Ask",
    "Attack",
    "Dropout",
    "EvalTask",
    "Evaluation",
    "Invalid",
    "Offer",
    "Profile",
    "Task",
    "TrainSettings",
    "TrainTask",
    "UpdateMeta",
    "client_id",
    "client_number",
    "digits",
    "task_from_json",
    "valid_id",
    "worker_id",
]
