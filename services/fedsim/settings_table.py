"""Every setting of fedsim, declared once: key, default, parser and one line on what it does.

The rows come in groups, in the order `.env.example`, the README's table,
compose.yaml and the Kubernetes ConfigMap show them; all four are written from
here by `python -m fedsim.settings_docs --write`. The aggregation rules' rows
come from their registry (`fedsim.rules`), which imports no rule. Defaults are
chosen for the default run (3 clients, mlp, async-weighted).
"""

from __future__ import annotations

import re

from fedsim.data.spread import availability_setting, bandwidth_setting, speed_setting
from fedsim.protocol.tasks import DEFAULT_MOMENTUM
from fedsim.rules import AGGREGATION, rule_settings
from fedsim.settings import (
    Group,
    Setting,
    boolean,
    choice,
    deadline,
    integer,
    number,
    optional_path,
    path,
    url,
    urls,
)

TRAIN_IMAGES = 60_000  # MNIST's training set; slices are cut from it
MODELS = ("mlp", "cnn")
OPTIMIZERS = ("sgd", "adam")
PARTITIONS = ("slices", "iid", "shards", "dirichlet")
ATTACKS = ("none", "label-flip", "scaled", "noise")  # fedsim.pipeline.attacks.KINDS and none
DP_MODES = ("off", "central", "local")  # fedsim.pipeline.dp
CODECS = ("none", "fp16", "int8", "topk")  # fedsim.pipeline.compress.CODECS
DEFAULT_SLICES = "1-4 5-8 9-12"  # CLIENT_SLICES when empty: three clients of four slices


def _secret(raw: str) -> str:
    value = raw.strip()
    if value and not re.fullmatch(r"[0-9a-f]{32,128}", value):
        raise ValueError("32-128 lowercase hex digits, as `python -m fedsim.tokens add` prints")
    return value


def _label(raw: str) -> str:
    value = raw.strip()
    if len(value) > 200 or not value.isprintable():
        raise ValueError("one line of at most 200 printable characters")
    return value


GROUPS: tuple[Group, ...] = (
    Group(
        "Data and logical clients",
        (
            Setting("PARTITION", "slices", choice(*PARTITIONS),
                "how the training images are dealt to logical clients, seeded by SEED: slices (the"
                " original), iid, shards (McMahan's non-IID), dirichlet"),
            Setting("NUM_IMAGES_TRAIN", "5000", integer(1, TRAIN_IMAGES),
                "images per slice; 5000 cuts MNIST's 60,000 into 12 slices, as the original"),
            Setting("CLIENT_SLICES", "", str,
                "PARTITION=slices: one inclusive slice range per logical client; empty:"
                f" {DEFAULT_SLICES}"),
            Setting("NUM_CLIENTS", "100", integer(1, TRAIN_IMAGES),
                "iid, shards, dirichlet: logical clients; 100 as in McMahan et al. 2017"),
            Setting("SHARDS_PER_CLIENT", "2", integer(1),
                "shards: label-sorted shards per client; 2 as in McMahan et al. 2017"),
            Setting("DIRICHLET_ALPHA", "0.5", number(0, above=True),
                "dirichlet: concentration of each class's split; smaller is more skewed"),
            Setting("DATA_VERIFY", "true", boolean,
                "check the MNIST files' SHA-256; false for other IDX data such as Fashion-MNIST"),
            Setting("MNIST_MIRRORS",
                "https://ossci-datasets.s3.amazonaws.com/mnist/ "
                "https://storage.googleapis.com/cvdf-datasets/mnist/",
                urls, "where missing MNIST files are downloaded from, tried in order"),
        ),
        "prepare writes the partition plan (partitions.json) once: changing these needs a"
        " reset (docker compose down -v).",
    ),
    Group(
        "Work: sampling, tasks and evaluation",
        (
            Setting("CLIENTS_PER_ROUND", "0", integer(0),
                "logical clients sampled per round (McMahan's C x K); 0: every range under slices,"
                " else a tenth of NUM_CLIENTS"),
            Setting("TASK_TIMEOUT", "300", number(0, above=True),
                "seconds a worker has for a task before it is given to another worker"),
            Setting("EVAL_EVERY", "0", integer(0),
                "asynchronous rules: score the global model every this many"
                " versions; 0: CLIENTS_PER_ROUND"),
        ),
    ),
    Group(
        "Workers: retries",
        (
            Setting("MAX_RETRY", "2", integer(1),
                "tries per HTTP request; a push that fails them all is kept and"
                " pushed again (original: 2)"),
            Setting("MAX_WAIT", "2", number(0),
                "upper bound in seconds of the random wait between tries (original: 2);"
                " an answer's Retry-After seconds replace it, up to 300"),
            Setting("HTTP_TIMEOUT", "30", number(0, above=True),
                "seconds a worker waits for one HTTP answer"),
        ),
    ),
    Group(
        "Training (sent to the workers with each task)",
        (
            Setting("EPOCHS", "5", integer(1),
                "local epochs per task (why 5: docs/benchmarks.md)"),
            Setting("BATCH_SIZE", "32", integer(1),
                "local minibatch size (why 32: docs/benchmarks.md)"),
            Setting("OPTIMIZER", "sgd", choice(*OPTIMIZERS),
                "the workers' optimizer, fresh per task: sgd (with MOMENTUM) or"
                " adam (why sgd: docs/benchmarks.md)"),
            Setting("LEARNING_RATE", "0.05", number(0, above=True),
                "the optimizer's step size; 0.05 suits sgd with momentum (use 0.001 with adam)"),
            Setting("MOMENTUM", f"{DEFAULT_MOMENTUM:g}", number(0, 1, below=True),
                "sgd's heavy-ball momentum; 0 is plain SGD, as McMahan et al. trained"
                " (adam ignores it)"),
            Setting("MODEL", "mlp", choice(*MODELS),
                "mlp: the original 784-200-200-10; cnn: McMahan et al.'s CNN"),
            Setting("SEED", "42", integer(0),
                "seeds the initial weights, the partition, the sampling and the"
                " shuffling, so runs repeat"),
            Setting("TF_THREADS", "0", integer(0),
                "TensorFlow threads per worker; 0: the machine's cores shared among the workers"),
        ),
    ),
    Group(
        "Aggregation",
        (
            AGGREGATION,
            Setting("OVERSELECT", "1", number(1),
                "round rules: ask ceil(OVERSELECT x CLIENTS_PER_ROUND) clients and close at the"
                " first CLIENTS_PER_ROUND arrivals; the rest are cancelled (docs/population.md)"),
            Setting("ROUND_DEADLINE", "off", deadline,
                "round rules: seconds on the run's clock a round waits for its arrivals; auto:"
                " median + 3 MADs of recent arrivals; off: no deadline"),
            Setting("MIN_CLIENTS", "0", integer(0),
                "with ROUND_DEADLINE: the fewest updates a round is published with at its deadline;"
                " fewer: it is retried with a new sample; 0: 1"),
            Setting("ROUNDS", "10", integer(1),
                "fedavg: rounds in the run; asynchronous rules off"
                " slices: ROUNDS x CLIENTS_PER_ROUND updates"),
        ),
    ),
    Group("Rule settings (each used only by the rules it names)", rule_settings()),
    Group(
        "Population and clocks (docs/population.md)",
        (
            Setting("CLIENT_SPEED", "1", speed_setting,
                "each logical client's compute time multiplier, seeded by SEED: a number,"
                " lognormal:MU,SIGMA, uniform:LO,HI or slow:FRACTION,FACTOR (a share FACTOR x slower)"),
            Setting("CLIENT_BANDWIDTH", "inf", bandwidth_setting,
                "each client's bytes per second for pulls and pushes: inf, a number or the same"
                " forms (slow:FRACTION,FACTOR,BASE)"),
            Setting("DROPOUT", "0", number(0, 1, below=True),
                "probability that a task fails part-way, drawn from the task's seed"),
            Setting("DROPOUT_MODE", "abort", choice("abort", "silent"),
                "abort: the worker gives a failed task back at once; silent: it says nothing and"
                " the lease runs out after TASK_TIMEOUT"),
            Setting("AVAILABILITY", "always", availability_setting,
                "always; diurnal[:F]: online the share F (0.5) of a simulated day from a seeded"
                " phase; trace:FILE: a CSV client,start,end of online windows in seconds"),
            Setting("CLOCK", "real", choice("real", "virtual"),
                "real: slow clients really take longer (their workers wait); virtual: updates"
                " taken in the order of their simulated arrival"),
            Setting("TIME_SCALE", "1", number(0, above=True),
                "real clock: simulated seconds per real second; 10 makes every wait a tenth"),
        ),
        "prepare writes the population (clients.json) beside the plan: changing CLIENT_SPEED,"
        " CLIENT_BANDWIDTH, DROPOUT or AVAILABILITY needs a reset (docker compose down -v).",
    ),
    Group(
        "Attack simulation",
        (
            Setting("ATTACK", "none", choice(*ATTACKS),
                "what the ATTACKERS send: label-flip (labels y -> 9 - y), scaled"
                " (w_t + ATTACK_SCALE (w - w_t)), noise (Gaussian of the model's scale)"),
            Setting("ATTACKERS", "0", integer(0),
                "logical clients that attack, chosen with SEED; the aggregation"
                " rule is not told which"),
            Setting("ATTACK_SCALE", "10", number(0, 1000, above=True),
                "scaled: the boost lambda of an attacker's update"),
        ),
    ),
    Group(
        "Differential privacy (round rules; docs/privacy.md)",
        (
            Setting("DP", "off", choice(*DP_MODES),
                "off; central: clipped updates averaged with equal weights, Gaussian noise on the"
                " mean (DP-FedAvg); local: each worker noises its own clipped update"),
            Setting("DP_CLIP", "1", number(0, above=True),
                "the L2 norm S each client's update w - w_t is clipped to"),
            Setting("DP_NOISE", "1", number(0),
                "noise multiplier z: std z x DP_CLIP / m on the mean of m updates (central), z x"
                " DP_CLIP on each update (local); 0 with central: no noise, epsilon infinite"),
            Setting("DP_DELTA", "0", number(0, 1, below=True),
                "the delta epsilon is reported at; 0: 1 / K^1.1 for K logical clients"),
            Setting("DP_CLIP_AT", "worker", choice("worker", "aggregator"),
                "central: where updates are clipped; the aggregator re-checks the norm either way"),
            Setting("DP_CLIP_QUANTILE", "0", number(0, 1, below=True),
                "central, DP_CLIP_AT=aggregator: adaptive clipping (Andrew et al. 2021), the clip"
                " norm follows this quantile of the update norms from DP_CLIP; 0: a fixed norm"),
            Setting("DP_CLIP_LR", "0.2", number(0, above=True),
                "adaptive clipping: the clip norm's geometric step size eta (0.2 in the paper)"),
            Setting("DP_CLIP_COUNT_NOISE", "0", number(0),
                "adaptive clipping: std of the noise on the count of unclipped updates; 0: m / 20"
                " (the paper's); must exceed DP_NOISE / 2"),
            Setting("DP_EPSILON_BUDGET", "0", number(0),
                "stop the run (checkpoint, one-line reason) before a round would take epsilon past"
                " this; 0: no budget"),
        ),
    ),
    Group(
        "Compressed updates (docs/compression.md)",
        (
            Setting("COMPRESSION", "none", choice(*CODECS),
                "how a worker sends its update w - w_t: none (float32), fp16, int8 (a scale per"
                " tensor), topk (the largest entries, with error feedback)"),
            Setting("COMPRESSION_TOPK", "0.01", number(0, 1, above=True),
                "topk: the fraction of each tensor's entries sent (k = ceil(fraction x size))"),
            Setting("COMPRESSION_DOWN", "none", choice("none", "fp16"),
                "how workers download the model to train from: none (float32) or fp16"),
        ),
    ),
    Group(
        "Secure aggregation (round rules that average; docs/secagg.md)",
        (
            Setting("SECAGG", "false", boolean,
                "true: workers mask each update so the aggregator learns only the round's"
                " weighted sum (Bonawitz et al. 2017)"),
            Setting("SECAGG_THRESHOLD", "0", integer(0),
                "clients that must stay in each phase, > half of CLIENTS_PER_ROUND; 0: two"
                " thirds, rounded up"),
            Setting("SECAGG_KEY_FILE", "secrets/workers/secagg.key", path,
                "the workers' secret their masks derive from (prepare writes it, mode 0600);"
                " never given to the aggregator"),
        ),
    ),
    Group(
        "TLS",
        (
            Setting("TLS", "false", boolean,
                "true: the proxy speaks HTTPS with the certificate from scripts/make-certs.sh, and"
                " workers use https:// with AGGREGATOR_URL's host and port"),
            Setting("TLS_CA", "certs/ca.pem", optional_path,
                "the CA workers check the proxy's certificate with over https:// (Compose:"
                " /certs/ca.pem); empty: the system's CAs"),
        ),
    ),
    Group(
        "Tokens",
        (
            Setting("TOKENS_FILE", "secrets/tokens.json", path,
                "who may change the aggregator's state (prepare creates it; Compose: ./secrets)"),
            Setting("CLIENT_TOKEN", "", _secret,
                "the token this worker or client sends; empty: the"
                " workers' token from TOKENS_FILE"),
            Setting("AUTH_READS", "false", boolean,
                "also require a token to read the model, status, history and metrics"),
        ),
        "Add a token for a hand-started client with `python -m fedsim.tokens add <name>`.",
    ),
    Group(
        "Checkpoints and limits (aggregator)",
        (
            Setting("SAVE_MODEL", "2", integer(1),
                "checkpoint every this many accepted updates (original: 2)"),
            Setting("DURABLE", "false", boolean,
                "acknowledge an update only once it is in a checkpoint or the fsynced"
                " journal (MODEL_DIR/journal.bin): none is lost at a kill; costs an fsync"
                " per group of concurrent updates"),
            Setting("KEEP_CHECKPOINTS", "5", integer(1),
                "checkpoints kept on disk; older ones are deleted"),
            Setting("IDLE_SAVE_SECONDS", "10", number(0, above=True),
                "checkpoint unsaved updates after this many idle seconds"),
            Setting("MAX_UPDATE_BYTES", "16777216", integer(1024),
                "largest accepted upload in bytes; 16 MiB fits the cnn (6.7 MB) with room"),
            Setting("CLIENT_QUOTA_VERSIONS", "10", integer(1, 1_000_000),
                "asynchronous rules: a client contributes at most its partition's samples to any"
                " this many consecutive versions; beyond, 429 (docs/api.md)"),
        ),
    ),
    Group(
        "Experiments (scripts/experiment.sh; docs/experiments.md)",
        (
            Setting("RUN_LABEL", "", _label,
                "a name for this run, shown on the dashboard and in /v1/status; an experiment"
                " sets it to its cell and seed"),
        ),
    ),
    Group(
        "Local runs only",
        (
            Setting("AGGREGATOR_URL", "http://127.0.0.1:8080", url,
                "where workers find the aggregator (Compose sets http://proxy:8080)"),
            Setting("DATA_DIR", "data", path,
                "folder of the four MNIST files (Compose mounts ./data at /data)"),
            Setting("MODEL_DIR", "models", path,
                "checkpoints, partitions.json and the history (Compose: the"
                " models volume at /models)"),
            Setting("WORKER_STATE_DIR", "worker-state", path,
                "COMPRESSION=topk: the residual of each logical client, shared by the workers"
                " (Compose: the worker-state volume at /state)"),
        ),
        "For scripts/simulate.sh and the Python commands run on the host: compose.yaml sets"
        " the container values itself, so these cannot break the containers.",
    ),
)  # fmt: skip

# Keys that Compose or scripts/swarm.sh read from the same .env; the Python code does not.
HOST_GROUPS: tuple[Group, ...] = (
    Group(
        "Docker Compose",
        (
            Setting("AGGREGATOR_PORT", "8080", str,
                "host port of the API and the dashboard (http://localhost:8080/)"),
            Setting("AGGREGATOR_HOST", "127.0.0.1", str,
                "host address they are published on: 127.0.0.1 keeps them on this machine; 0.0.0.0"
                " opens them to other machines"),
            Setting("PROMETHEUS_PORT", "9090", str,
                "host port of Prometheus' UI with `docker compose --profile monitoring up`"),
        ),
    ),
    Group(
        "Docker Swarm (scripts/swarm.sh; deploy/swarm/README.md)",
        (
            Setting("STACK", "fedsim", str,
                "stack name: services <STACK>_aggregator, _proxy, _client;"
                " checkpoints in the volume <STACK>_models"),
            Setting("WORKERS", "", str,
                "workers at `scripts/swarm.sh up`; empty: compose.yaml's replicas (3)"),
            Setting("REGISTRY", "", str,
                "a registry every node pulls the images from (host:port); empty: this node's images"
                " only (a single-node swarm)"),
            Setting("REGISTRY_PORT", "5000", str,
                "host port of `docker compose --profile registry up -d registry`"),
        ),
    ),
)  # fmt: skip

SETTINGS: tuple[Setting, ...] = tuple(row for group in GROUPS for row in group.rows)
KNOWN_KEYS = frozenset(s.key for s in SETTINGS)
RULE_KEYS = frozenset(s.key for s in rule_settings())  # kept in Settings.rules
COMPOSE_KEYS = frozenset(
    {s.key for group in HOST_GROUPS for s in group.rows} | {"COMPOSE_PROJECT_NAME", "COMPOSE_FILE"}
)
SECRET_KEYS = frozenset({"CLIENT_TOKEN"})  # never written to settings.json or reports
