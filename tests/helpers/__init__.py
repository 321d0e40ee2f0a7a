"""What the tests share, none of it TensorFlow.

builders: labels and plans, weights, checkpoints, upload bodies, the tokens file.
fakes: a clock, a learner, a worker's HTTP sent to an app in this process.
aggregator: the aggregator app in this process and the calls tests make to it.
servers: gunicorn and nginx on 127.0.0.1, slow clients, free ports, waiting on a condition.
dashboard (imported on its own): a stand-in aggregator for the dashboard, and Chromium.
"""

from .aggregator import (
    ROUNDS,
    AuthClient,
    answer,
    ask,
    bearer,
    build_app,
    drive,
    lookup,
    model_dir,
    planned,
    post,
    served,
    state_of,
)
from .builders import (
    LABELS,
    TYPED_TOKEN,
    WORKERS_TOKEN,
    prepared,
    st_bytes,
    tensors,
    upload,
    write_plan,
    write_population,
    write_tokens,
    write_v0,
)
from .fakes import FakeClock, FakeLearner, InProcess, in_process_transport
from .servers import (
    Server,
    Trickle,
    free_port,
    running_aggregator,
    start_gunicorn,
    start_nginx,
    wait_healthy,
    wait_until,
)

__all__ = [
    "LABELS",
    "ROUNDS",
    "TYPED_TOKEN",
    "WORKERS_TOKEN",
    "AuthClient",
    "FakeClock",
    "FakeLearner",
    "InProcess",
    "Server",
    "Trickle",
    "answer",
    "ask",
    "bearer",
    "build_app",
    "drive",
    "free_port",
    "in_process_transport",
    "lookup",
    "model_dir",
    "planned",
    "post",
    "prepared",
    "running_aggregator",
    "served",
    "st_bytes",
    "start_gunicorn",
    "start_nginx",
    "state_of",
    "tensors",
    "upload",
    "wait_healthy",
    "wait_until",
    "write_plan",
    "write_population",
    "write_tokens",
    "write_v0",
]
