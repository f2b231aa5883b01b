"""DeepSpeed ZeRO-2 (optimizer state + gradients sharded) and ZeRO-3 (parameters too), optional CPU offload.

We hand DeepSpeed a plain torch optimizer (its fused Adam would compile a C++ op first and does not
exist on CPU) and drive gradient accumulation ourselves with `set_gradient_accumulation_boundary`, so
the loop is the same for every strategy.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, ContextManager

import torch
from torch import nn

from .base import OptimizerFactory, Strategy

CHECKPOINT_TAG = "state"


class DeepSpeedStrategy(Strategy):
    def __init__(self, config, env, stage: int) -> None:
        super().__init__(config, env)
        self.stage = stage
        self.name = f"zero{stage}"
        self.grad_scale = 1.0

    def ds_config(self) -> dict[str, Any]:
        """The user's DeepSpeed JSON (if any) with the values our config owns filled in."""
        train = self.config.train
        ds: dict[str, Any] = {}
        if train.deepspeed_config:
            path = Path(train.deepspeed_config)
            if not path.is_file():
                raise FileNotFoundError(f"train.deepspeed_config: '{path}' does not exist.")
            ds = json.loads(path.read_text())
        zero = ds.setdefault("zero_optimization", {})
        zero["stage"] = self.stage
        if train.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self.env.device.type == "cuda"}
        if train.offload_params:
            if self.stage != 3:
                raise ValueError("train.offload_params needs train.strategy=zero3 (ZeRO-2 keeps parameters whole).")
            zero["offload_param"] = {"device": "cpu", "pin_memory": self.env.device.type == "cuda"}
        if zero.get("offload_optimizer"):
            ds["zero_force_ds_cpu_optimizer"] = False  # our torch AdamW steps on CPU; no C++ op to build
        ds.update({
            "train_micro_batch_size_per_gpu": train.batch_size,
            "gradient_accumulation_steps": 1,  # we mark the boundary ourselves (see micro_batch)
            "train_batch_size": train.batch_size * self.env.world_size,
            "gradient_clipping": max(train.max_grad_norm, 0.0),
            # ZeRO finds a non-finite gradient norm and skips that update itself (fp32, and bf16 with this).
            "bf16": {"enabled": self.bf16, "check_grad_overflow": True},
            "fp16": {"enabled": False},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        })
        return ds

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> nn.Module:
        import deepspeed

        self.inner = model.to(self.env.device)
        optimizer = make_optimizer(self.inner)
        if self.stage == 3:
            # Parameters the fusion uses directly (not through a submodule's forward) are fetched
            # whenever the VLM's forward runs.
            for param in model.fusion.external_parameters():
                deepspeed.zero.register_external_parameter(model, param)
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=self.inner, optimizer=optimizer, config=self.ds_config(), dist_init_required=False
        )
        self.engine = engine
        self.model = engine
        self.optimizer = optimizer  # the torch optimizer: its param_groups carry the learning rates
        return engine

    def micro_batch(self, last: bool) -> ContextManager:
        self.engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def scale_gradients(self, factor: float) -> None:
        """ZeRO holds the gradients in its own partitions: the factor is applied in `step`, as a loss scale."""
        self.grad_scale = factor

    def step(self, max_norm: float) -> float:
        """ZeRO clips in its partitions (`gradient_clipping`) after dividing by its loss scale: a loss scale of
        1 / factor there is `scale_gradients(factor)`, norm and clipping included. It goes back to 1 before
        the next backward, which ZeRO multiplies by the same scale."""
        self.engine.optimizer.override_loss_scale(1.0 / self.grad_scale)
        try:
            self.engine.step()
        finally:
            self.engine.optimizer.override_loss_scale(1.0)
            self.grad_scale = 1.0
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def skip_step(self) -> None:
        """ZeRO has no public 'discard these gradients'. Its step finds a non-finite gradient norm and skips
        the update itself (clearing the gradients); for any other case the step runs at learning rate 0, so
        the weights stay exactly as they are."""
        saved = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0
        self.engine.step()
        for group, lr in zip(self.optimizer.param_groups, saved):
            group["lr"] = lr

    def save_state(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, exclude_frozen_parameters=True)

    def load_state(self, directory: Path) -> None:
        self.engine.load_checkpoint(
            str(directory), tag=CHECKPOINT_TAG, load_module_strict=False, load_lr_scheduler_states=False
        )

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        import deepspeed

        params = list(self.inner.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.stage == 3):
            state = {k: v.detach().cpu().clone() for k, v in self.inner.state_dict().items()} \
                if self.env.is_main else None
        return state

    def unwrapped(self) -> nn.Module:
        return self.inner
