"""The training loop's one handle on publishing, driven by the `hub.*` config keys.

The loop makes two calls on the main process: `on_save` after each checkpoint and `on_end` after
`final/` is written. Pushes run in the background (training never waits on the network); the
last one is awaited in `on_end`, so the process does not exit with an upload half done.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from ..config import Config, config_to_dict
from .model_card import write_model_card
from .push import BackgroundPusher

logger = logging.getLogger(__name__)

LATEST_DIR = "hub-latest"
"""Under `output_dir`: the model folder pushed at each save with `hub.strategy: every_save`."""


class TrainingPublisher:
    """Model card on `final/`; pushes per `hub.push` / `hub.strategy`; errors surface in `on_end`."""

    def __init__(self, config: Config, output_dir: Optional[str | Path] = None) -> None:
        self.config = config
        self.output_dir = Path(output_dir or config.output_dir)
        hub = config.hub
        self._pusher = (
            BackgroundPusher(hub.repo_id, hub.private, hub.revision, hub.endpoint) if hub.push else None
        )

    def on_save(self, folder: str | Path, step: int) -> None:
        """After checkpoint `step` (main process): with `hub.strategy: every_save`, give `folder` (the loop's
        `output_dir/hub-latest`, written as `final/` is: a VLM folder or a LoRA adapter folder) its model card
        and queue a push of it in the background."""
        if self._pusher is None or self.config.hub.strategy != "every_save":
            return
        write_model_card(folder, config_to_dict(self.config), {"step": step}, repo_id=self.config.hub.repo_id)
        self._pusher.push(Path(folder), f"Training in progress, step {step}")

    def on_end(self, final_dir: str | Path, metrics: Optional[dict[str, Any]] = None) -> list[str]:
        """After `final/` is written (main process): write its model card, push it, await every push.

        Returns the commit URLs (none when `hub.push` is off); raises `PushError` naming what failed
        (the local `final/` is complete either way).
        """
        write_model_card(final_dir, config_to_dict(self.config), metrics, repo_id=self.config.hub.repo_id)
        if self._pusher is None:
            return []
        try:
            self._pusher.push(final_dir, "Final model")
            urls = self._pusher.wait()
        finally:
            self._pusher.close()
        logger.info("Pushed the final model to %s: %s", self.config.hub.repo_id, urls[-1])
        return urls

    def close(self) -> None:
        """For the loop's error path: let queued pushes finish and clean up, without raising."""
        if self._pusher is not None:
            self._pusher.close()
