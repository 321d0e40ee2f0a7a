"""TensorFlow's runtime: quiet logs and thread pools sized for the workers sharing the machine.

Both must be set before TensorFlow starts its runtime (its first operation), so
`configure` runs once, early, in every process that trains or scores.
"""

from __future__ import annotations

import os
import sys


def keep_pyplot_out() -> None:
    """Stop Keras importing matplotlib.pyplot in a process that draws nothing (a worker).

    Keras imports pyplot at start when matplotlib is installed (the client image has it for
    evaluate's PNGs); in a fresh container that builds matplotlib's font cache, seconds of
    a worker's start-up. With the module marked absent, Keras takes its ImportError path.
    Call before importing TensorFlow; fedsim's own plots use matplotlib.figure, not pyplot.
    """
    sys.modules.setdefault("matplotlib.pyplot", None)  # type: ignore[arg-type]


def quiet() -> None:
    """Keep TensorFlow's C++ info lines out of the logs; call before importing it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # oneDNN announces itself on stderr before any log level applies; for these
    # small models it is no faster here (5 epochs of 5,000 images: 1.4 s either
    # way), and without it results repeat bit for bit.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def threads_for(tf_threads: int, workers: int, cpu_count: int | None = None) -> int:
    """Intra-op threads: TF_THREADS, or with 0 the machine's cores shared among the workers."""
    if tf_threads:
        return tf_threads
    # Every worker would otherwise claim all cores and they would fight over them;
    # one share each keeps the machine busy without thrashing.
    return max(1, (cpu_count or os.cpu_count() or 1) // max(1, workers))


def import_tensorflow() -> None:
    """Import TensorFlow (seconds) without starting its runtime: threads can still be set."""
    quiet()
    import tensorflow  # noqa: F401


def configure(intra_op: int) -> None:
    """Quiet TensorFlow and size its thread pools; call before its first operation."""
    quiet()
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        tf.config.threading.set_inter_op_parallelism_threads(1)  # one small graph at a time
    except RuntimeError:
        pass  # the runtime has started in this process already: its pools stay as they are
