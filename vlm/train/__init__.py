"""Training: the loop, and the one function that decides what is frozen."""

from .freezing import apply_stage, parameter_table
from .loop import train

__all__ = ["train", "apply_stage", "parameter_table"]
