"""Checkpoint state for torch-native strategies (single, DDP, FSDP2) through torch.distributed.checkpoint.

DCP writes each rank's shard in parallel and reshapes on load, and `get_state_dict` strips wrapper
prefixes, so one code path serves replicated and sharded models. Frozen parameters are not saved:
they come back from the backbones.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

_OPTIONS = StateDictOptions(ignore_frozen_params=True)


def save_dcp(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(directory))


def load_dcp(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
