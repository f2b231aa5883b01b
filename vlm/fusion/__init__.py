"""Fusion strategies, registered by name; importing this package registers all of them."""

from . import projector  # noqa: F401  (registers "projector")
from . import cross_attention  # noqa: F401  (registers "cross_attention")
from . import early  # noqa: F401  (registers "early")
from . import late  # noqa: F401  (registers "late")
from . import resampler_projector  # noqa: F401  (registers "resampler")
from .base import Fusion, FusionOutput, build_fusion, register_fusion

__all__ = ["Fusion", "FusionOutput", "build_fusion", "register_fusion"]
