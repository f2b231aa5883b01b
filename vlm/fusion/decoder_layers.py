"""Run extra blocks before chosen decoder layers of any HF LM, by composition.

`PreLayerWrapper` holds the original decoder layer as its child `layer`, runs a callable it is
handed at call time (never stored) on the hidden states, then calls the layer unchanged. State-dict
hooks drop / restore the `layer.` segment, so the LM's checkpoint keys do not change.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Protocol

import torch
from torch import nn

from ..lm import find_decoder_layers

STATE_KWARG = "vlm_pre_layer_state"
"""Forward keyword under which the per-call state travels from the LM's forward to its layers."""

_ACTIVE_STATE: contextvars.ContextVar["PreLayerState | None"] = contextvars.ContextVar(
    "vlm_pre_layer_state", default=None
)


class PreLayerState(Protocol):
    past_length: int | None
    """Sequence positions already in the LM's KV cache for the current forward; set by the LM's
    position hook (`wrap_layers`) before any layer runs, None until then."""

    def __call__(self, layer_index: int, hidden_states: torch.Tensor, past_length: int) -> torch.Tensor:
        """hidden_states [batch, q, dim] of queries at absolute positions past_length.. -> same shape."""


@contextlib.contextmanager
def active_state(state: PreLayerState | None) -> Iterator[None]:
    """Make `state` visible to the wrappers for the duration of the block (used by `generate`,
    which rejects unknown forward keywords); always reset on exit."""
    token = _ACTIVE_STATE.set(state)
    try:
        yield
    finally:
        _ACTIVE_STATE.reset(token)


def past_length_of_call(kwargs: dict[str, Any]) -> int:
    """Positions already cached before this forward of a causal LM, from its public call keywords.

    The 2-D attention mask covers cached and new positions (generate grows it by one per step), so
    past = mask length - new length. Without a mask, a cache object under any keyword is asked its
    length. Decoder layers' own keywords are not read: they are internal and have been renamed
    upstream before (`past_key_value` -> `past_key_values` -> `cache`), which once made every decode
    step look like position 0. When neither is there and something cache-like is, raise.
    """
    new = next((kwargs[k] for k in ("inputs_embeds", "input_ids") if kwargs.get(k) is not None), None)
    mask = kwargs.get("attention_mask")
    if new is not None and isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask.shape[1] - new.shape[1]
    caches = [v for v in kwargs.values() if hasattr(v, "get_seq_length")]
    if caches:
        return int(caches[0].get_seq_length())
    cache_like = [k for k, v in kwargs.items() if v is not None and ("cache" in k or "past" in k) and k != "use_cache"]
    if cache_like or new is None:
        raise RuntimeError(
            f"Cannot tell how many positions the LM has cached (keywords {sorted(kwargs)}); pass a 2-D "
            "attention_mask to the LM so image-aware layers know each token's position."
        )
    return 0


def _record_past_length(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """Forward pre-hook on the LM: tell the call's state where this forward's tokens start (generate
    calls the LM through `__call__`; peft's training forward does not, so fusions also set it)."""
    state = kwargs.get(STATE_KWARG) or _ACTIVE_STATE.get()
    if state is not None:
        if args:
            raise RuntimeError("Call the LM with keyword arguments when image-aware layers are attached.")
        state.past_length = past_length_of_call(kwargs)


class PreLayerWrapper(nn.Module):
    """Runs the call's `PreLayerState` (if any) on the hidden states, then the original layer."""

    def __init__(self, layer: nn.Module, layer_index: int) -> None:
        super().__init__()
        self.layer = layer
        self.layer_index = layer_index
        self.register_state_dict_post_hook(_drop_layer_segment)
        self.register_load_state_dict_pre_hook(_add_layer_segment)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        state = kwargs.pop(STATE_KWARG, None) or _ACTIVE_STATE.get()
        if state is not None:
            past = state.past_length
            if past is None:
                raise RuntimeError(
                    "An image-aware decoder layer ran before the LM's position hook; call the LM module that "
                    "was given to `wrap_layers`, not its inner decoder."
                )
            if args:
                args = (state(self.layer_index, args[0], past), *args[1:])
            else:
                kwargs["hidden_states"] = state(self.layer_index, kwargs["hidden_states"], past)
        return self.layer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # e.g. `attention_type`, read by some decoders' forward
            return getattr(super().__getattr__("layer"), name)


def _drop_layer_segment(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "layer.")]:
        state_dict[prefix + key[len(prefix) + len("layer."):]] = state_dict.pop(key)


def _add_layer_segment(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "layer.")]:
        state_dict[prefix + "layer." + key[len(prefix):]] = state_dict.pop(key)


def wrap_layers(lm: nn.Module, indices: list[int]) -> list[int]:
    """Wrap `lm`'s decoder layers at `indices` and hook `lm`'s forward to record each call's past
    length (both idempotent); returns the indices now wrapped."""
    layers = find_decoder_layers(lm)
    if not any(hook is _record_past_length for hook in lm._forward_pre_hooks.values()):
        lm.register_forward_pre_hook(_record_past_length, with_kwargs=True)
    for i in indices:
        if not isinstance(layers[i], PreLayerWrapper):
            layers[i] = PreLayerWrapper(layers[i], i)
    return [i for i, layer in enumerate(layers) if isinstance(layer, PreLayerWrapper)]

