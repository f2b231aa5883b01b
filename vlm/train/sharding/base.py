"""The strategy interface: everything the loop needs from DDP, FSDP2 or DeepSpeed, and nothing else.

The same classes run on CPU (gloo, tested in CI under torchrun) and on GPUs (NCCL, under torchrun or
`accelerate launch`), so the sharded code path that CI proves is the one users run.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, ContextManager

import torch
from torch import nn

from ...config import Config
from ..distributed import DistEnv

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


class Strategy(ABC):
    """Owns the wrapped model and the optimizer; the step (vlm/train/step.py) calls these in order:
    `micro_batch(last)` around each forward/backward, `backward`, then `scale_gradients` and `step`
    (or `skip_step` for a bad step). `model` is what to call (the wrapper), `unwrapped()` the VLM itself."""

    name = "base"
    replicated = False
    """True when the unwrapped model holds every parameter whole on rank 0 (it can be saved as it is)."""

    def __init__(self, config: Config, env: DistEnv) -> None:
        self.config = config
        self.env = env
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.bf16 = config.train.mixed_precision == "bf16" or (
            config.train.mixed_precision == "auto" and env.device.type == "cuda" and torch.cuda.is_bf16_supported()
        )

    @abstractmethod
    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> nn.Module:
        """Move / shard / wrap `model`, build its optimizer on the final parameters; return what to call."""

    def micro_batch(self, last: bool) -> ContextManager:
        """Context for one micro-batch's forward + backward; `last` is the one that syncs gradients."""
        return contextlib.nullcontext()

    def autocast(self) -> ContextManager:
        """bf16 autocast on CUDA, and on CPU when asked for (`train.mixed_precision: bf16`; CPUs with AVX512-BF16
        or AMX run its matmuls natively); weights, gradients and optimizer states stay fp32."""
        if self.bf16 and self.env.device.type in ("cuda", "cpu"):
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """`loss`: this micro-batch's token-loss sum (the gradients are scaled at the step's end)."""
        loss.backward()

    def scale_gradients(self, factor: float) -> None:
        """Multiply this step's (reduced) gradients by `factor` before `step` clips and applies them."""
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def step(self, max_norm: float) -> float:
        """Clip to `max_norm` (<= 0: no clipping), apply the update, clear gradients; return the
        global gradient norm before clipping."""
        params = [p for p in self.trainable_parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def skip_step(self) -> None:
        """A bad step: no update, gradients cleared."""
        self.optimizer.zero_grad(set_to_none=True)

    @abstractmethod
    def save_state(self, directory: Path) -> None:
        """Trainable weights + optimizer state (each rank its shard where sharded); called on every rank."""

    @abstractmethod
    def load_state(self, directory: Path) -> None:
        """Inverse of `save_state`, on the same world size; called on every rank."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Every parameter and buffer, unsharded, on CPU, on rank 0 (None elsewhere); called on every rank."""

    def unwrapped(self) -> nn.Module:
        """The VLM itself (for saving or evaluation outside the wrapper)."""
        return self.model
