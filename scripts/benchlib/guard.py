"""The load check and the figures' marks.

They live in fedsim.experiment.guard, which the experiment runner uses too.
"""

from fedsim.experiment.guard import LOAD_LIMIT, Bench, add_arguments

__all__ = ["LOAD_LIMIT", "Bench", "add_arguments"]
