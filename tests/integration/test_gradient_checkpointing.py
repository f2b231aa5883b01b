"""Per-component activation checkpointing: same loss and gradients, fewer saved activations, blocks recomputed."""

import copy

import pytest
import torch

from vlm.config import ConfigError, ModelConfig, load_config
from vlm.data.collator import Collator
from vlm.data.formats import read_samples
from vlm.factory import processor_for
from vlm.model import VLM
from vlm.train.freezing import apply_stage
from vlm.train.speed import apply_gradient_checkpointing


@pytest.fixture(scope="module")
def xattn_vlm(backbones):
    torch.manual_seed(0)
    config = ModelConfig(vision=str(backbones["vit"]), lm=str(backbones["lm"])).with_fusion(
        "cross_attention", every_n_layers=2)
    model = VLM.from_config(config)
    with torch.no_grad():  # open the gates so the blocks matter
        for block in model.fusion.blocks.values():
            block.attn_gate.fill_(0.5)
            block.ffn_gate.fill_(0.5)
    apply_stage(model, "finetune")
    return model.train()


def step(model, batch) -> tuple[float, dict[str, torch.Tensor], int, dict[str, int]]:
    """Loss, gradients, bytes of activations kept for the backward pass, calls per watched module."""
    saved = [0]
    calls = {"lm": 0, "fusion": 0}

    def counter(name: str):
        return lambda *args: calls.__setitem__(name, calls[name] + 1)

    hooks = [
        model.lm.model.layers[1].layer.self_attn.q_proj.register_forward_hook(counter("lm")),
        model.fusion.blocks["1"].q_proj.register_forward_hook(counter("fusion")),
    ]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    for hook in hooks:
        hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads, saved[0], calls


def test_checkpointing_lm_and_fusion_keeps_results_and_saves_memory(xattn_vlm, synthetic):
    samples = read_samples(synthetic["train"])[0][:3]
    batch = Collator(xattn_vlm.tokenizer.pad_token_id)([processor_for(xattn_vlm)(s) for s in samples])
    batch = {k: getattr(batch, k) for k in ("input_ids", "attention_mask", "pixel_values", "labels")}
    plain_loss, plain_grads, plain_saved, plain_calls = step(xattn_vlm, batch)

    lm_only = copy.deepcopy(xattn_vlm)
    assert apply_gradient_checkpointing(lm_only, True) == ["lm"]  # the old boolean: the LM
    _, _, lm_saved, lm_calls = step(lm_only, batch)

    both = copy.deepcopy(xattn_vlm)
    assert apply_gradient_checkpointing(both, ["lm", "fusion"]) == ["lm", "fusion"]
    loss, grads, both_saved, both_calls = step(both, batch)

    assert plain_calls == {"lm": 1, "fusion": 1}
    assert lm_calls == {"lm": 2, "fusion": 1}  # the decoder layer is recomputed in the backward pass
    assert both_calls == {"lm": 2, "fusion": 2}  # ... and now the cross-attention block too
    assert both_saved < lm_saved < plain_saved
    assert loss == pytest.approx(plain_loss, abs=1e-6)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert list(both.state_dict()) == list(xattn_vlm.state_dict())  # checkpoint keys unchanged

    both.eval()  # no recomputation outside training
    with torch.no_grad():
        torch.testing.assert_close(both(**batch).logits, xattn_vlm.eval()(**batch).logits)
    xattn_vlm.train()


def test_components_are_validated_and_configurable(tiny_vlm):
    with pytest.raises(ValueError, match="train.gradient_checkpointing_components.*'projector'"):
        apply_gradient_checkpointing(tiny_vlm, ["lm", "projector"])
    assert apply_gradient_checkpointing(tiny_vlm, False) == []
    assert apply_gradient_checkpointing(tiny_vlm, ["vision"]) == []  # a frozen tower keeps no activations
    config = load_config(
        None, ["train.gradient_checkpointing=true", "train.gradient_checkpointing_components=[lm,fusion]"]
    )
    assert config.train.gradient_checkpointing_components == ["lm", "fusion"]
    assert load_config(None, []).train.gradient_checkpointing_components == ["lm"]
    with pytest.raises(ConfigError, match="train.gradient_checkpointing_components"):
        load_config(None, ["train.gradient_checkpointing_components={a: 1}"])
