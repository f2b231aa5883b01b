"""FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and optimizer state sharded.

Units, innermost first, as each component names its own (cf. prismatic's per-backbone
`get_fsdp_wrapping_policy`): the LM's decoder layers (`vlm.lm.shard_units`); the fusion's units
(`Fusion.shard_units`, e.g. one per gated cross-attention block, then the fusion); the vision tower's
(`VisionEncoder.shard_units`) only with `train.shard_vision`; and the VLM root (token embeddings, final
norm, LM head; a replicated tower is left out via `ignored_params`). In the `align` and `finetune`
stages each unit is either wholly frozen or wholly trained. The methods other than `forward` that the
fusion says touch parameters (`Fusion.forward_methods`) are registered so FSDP gathers for them too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from ... import lm as lm_units
from .base import OptimizerFactory, Strategy
from .dcp_state import load_dcp, save_dcp


class FSDP2Strategy(Strategy):
    name = "fsdp2"

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> nn.Module:
        model.to(self.env.device)
        mesh = init_device_mesh(self.env.device.type, (self.env.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.bf16 \
            else MixedPrecisionPolicy()
        shard = dict(mesh=mesh, mp_policy=mp)
        for layer in lm_units.shard_units(model.lm):
            fully_shard(layer, **shard)
        for unit in model.fusion.shard_units():
            fully_shard(unit, **shard)
        for module, method in model.fusion.forward_methods():
            register_fsdp_forward_method(module, method)
        ignored = None
        if self.config.train.shard_vision:
            for unit in model.vision.shard_units():
                fully_shard(unit, **shard)
        else:
            ignored = set(model.vision.parameters())
        fully_shard(model, ignored_params=ignored, **shard)
        self.model = model
        self.optimizer = make_optimizer(model)
        return model

    def save_state(self, directory: Path) -> None:
        save_dcp(self.model, self.optimizer, directory)

    def load_state(self, directory: Path) -> None:
        load_dcp(self.model, self.optimizer, directory)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.env.is_main:
            return None
        # The replicated tower is outside FSDP's state dict handling only when ignored; include it either way.
        for name, tensor in self.model.vision.state_dict().items():
            state.setdefault(f"vision.{name}", tensor.detach().cpu())
        return state

