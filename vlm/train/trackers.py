"""Metrics to TensorBoard or W&B through accelerate's tracker classes, from rank 0 only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import Config, config_to_dict


class Trackers:
    """Every tracker `train.report_to` names (a list, as with transformers' Trainer; `none` or `[]`: none)."""

    def __init__(self, config: Config, output_dir: Path, enabled: bool) -> None:
        self.trackers: list[Any] = []
        if not enabled:
            return
        report_to = config.train.report_to
        report_to = [report_to] if isinstance(report_to, str) else report_to  # set in code, past the loader
        names = dict.fromkeys(n for n in report_to if n != "none")  # ordered, without repeats
        for name in names:
            if name == "tensorboard":
                from accelerate.tracking import TensorBoardTracker

                tracker = TensorBoardTracker("vlm", output_dir)
            else:
                from accelerate.tracking import WandBTracker

                tracker = WandBTracker(output_dir.name)
            if hasattr(tracker, "start"):
                tracker.start()
            tracker.store_init_configuration(_flat(config_to_dict(config)))
            self.trackers.append(tracker)

    def log(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Trackers such as TensorBoard's hparams take flat scalar values only."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat
