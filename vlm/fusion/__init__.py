"""Fusion strategies, registered by name; importing this package imports every module in it, so each
strategy file registers itself (a new strategy is a new file here, nothing else to edit)."""

import importlib
import pkgutil

from .base import Fusion, FusionOutput, LMShape, VisionShape, build_fusion, register_fusion

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Fusion", "FusionOutput", "LMShape", "VisionShape", "build_fusion", "register_fusion"]
