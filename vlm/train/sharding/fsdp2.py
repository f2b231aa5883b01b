"""FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and optimizer state sharded.

Units, innermost first: each LM decoder layer; each block of the fusion's block lists (e.g. one per
gated cross-attention block); the fusion module; the vision tower (its blocks and itself) only with
`train.shard_vision`; and the VLM root (token embeddings, final norm, LM head; a replicated tower is
left out via `ignored_params`). In the `align` and `finetune` stages each unit is either wholly frozen
or wholly trained. Fusion methods other than `forward` that touch parameters are registered so FSDP
gathers the parameters for them too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from ...fusion.decoder_layers import find_decoder_layers
from .base import OptimizerFactory, Strategy
from .dcp_state import load_dcp, save_dcp

FUSION_METHODS = ("embed_images", "lm_forward", "lm_generate", "encode")
"""Fusion entry points the model calls besides `forward`."""


class FSDP2Strategy(Strategy):
    name = "fsdp2"

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> nn.Module:
        model.to(self.env.device)
        mesh = init_device_mesh(self.env.device.type, (self.env.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.bf16 \
            else MixedPrecisionPolicy()
        shard = dict(mesh=mesh, mp_policy=mp)
        for layer in find_decoder_layers(model.lm):
            fully_shard(layer, **shard)
        for child in model.fusion.children():
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                for block in child.values() if isinstance(child, nn.ModuleDict) else child:
                    fully_shard(block, **shard)
                    if hasattr(block, "key_values"):
                        register_fsdp_forward_method(block, "key_values")
        fully_shard(model.fusion, **shard)
        for method in FUSION_METHODS:
            if hasattr(model.fusion, method):
                register_fsdp_forward_method(model.fusion, method)
        ignored = None
        if self.config.train.shard_vision:
            for block in _vision_blocks(model.vision):
                fully_shard(block, **shard)
            fully_shard(model.vision, **shard)
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


def _vision_blocks(vision: nn.Module) -> list[nn.Module]:
    """The tower's repeated blocks (timm `blocks`, transformers `encoder.layers`), if it has them."""
    for module in vision.modules():
        for attr in ("blocks", "layers", "layer"):
            found = getattr(module, attr, None)
            if isinstance(found, nn.ModuleList) and len(found) > 1:
                return list(found)
    return []
