"""Put converted weights into a model, all or nothing, naming the first tensor that does not fit.

`load_state_dict(strict=True)` lists every missing and unexpected key in one long message; a person
converting a checkpoint needs the one tensor to look at, so this names it, then loads strictly.
"""

from __future__ import annotations

import torch
from torch import nn


class WeightsError(ValueError):
    """A state dict that does not fit its model; the message names the tensor."""


def load_exactly(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load `state_dict` into `model` with every tensor present, of the right shape, and nothing extra.

    source: what the weights came from (a file, a package), for the message.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(
            f"{source}: no tensor for '{missing[0]}'{more}; the file is not this architecture's weights."
        )
    extra = [k for k in state_dict if k not in expected]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise WeightsError(f"{source}: tensor '{extra[0]}'{more} has no place in the model.")
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise WeightsError(
                f"{source}: tensor '{key}' has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[key].shape)}."
            )
    model.load_state_dict(state_dict, strict=True)
