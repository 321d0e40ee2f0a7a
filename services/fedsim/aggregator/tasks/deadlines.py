"""ROUND_DEADLINE: how long a round waits for its arrivals, fixed or learnt from recent rounds.

`auto` sets the deadline from the arrival times of the last `AUTO_ROUNDS` rounds
(seconds from a round's opening to each update it took, on the run's clock):

    D = median(x) + AUTO_K * 1.4826 * MAD(x),   MAD(x) = median(|x - median(x)|)

1.4826 * MAD estimates the standard deviation of normal data robustly (Rousseeuw
and Croux 1993, "Alternatives to the median absolute deviation", JASA 88), so D
is about three standard deviations past the typical arrival, and one straggler
in the history does not move it much. Before any round has closed there is no
history: the first round waits `fallback` seconds (TASK_TIMEOUT, the time after
which a task is given up on anyway). A retried attempt a waits D * 2^(a-1): the
arrivals a too short deadline lets in are only the fast ones, so without the
doubling a round could be retried for ever. D is at least AUTO_FLOOR (1 s), which
arrivals all at the round's opening would otherwise bring to 0.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

AUTO_K = 3.0  # robust standard deviations past the median
AUTO_ROUNDS = 5  # rounds of arrivals the estimate looks at
MAD_TO_SD = 1.4826  # 1 / Phi^-1(3/4): MAD -> standard deviation for normal data
AUTO_FLOOR = 1.0  # seconds: instant arrivals (all at 0) would give D = 0, which no round meets


def auto(recent: Iterable[Iterable[float]], fallback: float) -> float:
    """D = median + AUTO_K x 1.4826 x MAD of the arrivals of the `recent` rounds (pooled);
    `fallback` without any."""
    x = np.asarray([t for arrivals in recent for t in arrivals], dtype=np.float64)
    if x.size == 0:
        return float(fallback)
    median = float(np.median(x))
    mad = float(np.median(np.abs(x - median)))
    return max(AUTO_FLOOR, median + AUTO_K * MAD_TO_SD * mad)
