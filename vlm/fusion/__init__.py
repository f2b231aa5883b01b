"""Fusion strategies, registered by name; importing this package registers all of them."""

from . import projector  # noqa: F401  (registers "projector")
from . import cross_attention  # noqa: F401  (registers "cross_attention")
from .base import Fusion, build_fusion, register_fusion

__all__ = ["Fusion", "build_fusion", "register_fusion"]
