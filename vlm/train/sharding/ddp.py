"""One process, or plain data parallelism (every rank a full replica, gradients all-reduced)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ContextManager

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .base import OptimizerFactory, Strategy
from .dcp_state import load_dcp, save_dcp


class DDPStrategy(Strategy):
    """`single` with one process, `ddp` otherwise; the model is unchanged apart from the wrapper."""

    name = "ddp"
    replicated = True

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> nn.Module:
        self.inner = model.to(self.env.device)
        self.model = self.inner
        if self.env.distributed:
            device_ids = [self.env.local_rank] if self.env.device.type == "cuda" else None
            # Every trainable parameter takes part in every step (text-only batches run a zero-weight
            # placeholder image, vlm/image_positions.py), so the cheaper find_unused_parameters=False is safe.
            self.model = DistributedDataParallel(self.inner, device_ids=device_ids)
        self.optimizer = make_optimizer(self.inner)
        return self.model

    def micro_batch(self, last: bool) -> ContextManager:
        if self.env.distributed and not last:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def save_state(self, directory: Path) -> None:
        save_dcp(self.model, self.optimizer, directory)

    def load_state(self, directory: Path) -> None:
        load_dcp(self.model, self.optimizer, directory)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if not self.env.is_main:
            return None
        return {k: v.detach().cpu() for k, v in self.inner.state_dict().items()}

    def unwrapped(self) -> nn.Module:
        return self.inner
