"""With labels, logits are computed only where the loss reads them; loss and those logits are unchanged."""


import pytest
import torch

from vlm.data.collator import Collator
from vlm.data.formats import read_samples
from vlm.data.sample import Sample
from vlm.factory import processor_for
from vlm.loss import IGNORE_INDEX
from vlm.model import VLM


def test_supervised_positions_only_same_loss_and_logits(tiny_vlm, synthetic):
    samples = read_samples(synthetic["train"])[0][:3]
    batch = Collator(tiny_vlm.tokenizer.pad_token_id)([processor_for(tiny_vlm)(s) for s in samples])
    inputs = {k: getattr(batch, k) for k in ("input_ids", "attention_mask", "pixel_values", "labels")}
    tiny_vlm.eval()
    with torch.no_grad():
        trimmed = tiny_vlm(**inputs)
        full = tiny_vlm(**inputs, full_logits=True)
    supervised = inputs["labels"][:, 1:] != IGNORE_INDEX
    assert trimmed.logits.shape == (int(supervised.sum()), full.logits.shape[-1])
    torch.testing.assert_close(trimmed.logits, full.logits[:, :-1][supervised], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trimmed.loss, full.loss, atol=1e-6, rtol=1e-6)
    no_labels = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        assert tiny_vlm(**no_labels).logits.shape == full.logits.shape  # generation / eval paths untouched


@pytest.mark.parametrize("fusion", ["early", "resampler", "late", "cross_attention"])
def test_every_fusion_gives_the_same_loss_with_logits_at_labels_only(model_config, synthetic, fusion):
    """No fusion opts out: each hands `logits_to_keep` to the LM (late fusion mixes only there)."""
    torch.manual_seed(0)
    options = {"resampler": {"latents": 4}, "cross_attention": {"resampler_latents": 4}}.get(fusion, {})
    model = VLM.from_config(model_config.with_fusion(fusion, **options)).eval()
    samples = read_samples(synthetic["train"])[0][:3]
    samples.append(Sample("text", [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]))
    batch = Collator(model.tokenizer.pad_token_id)([processor_for(model)(s) for s in samples])
    inputs = {k: getattr(batch, k) for k in ("input_ids", "attention_mask", "pixel_values", "labels")}
    with torch.no_grad():
        trimmed = model(**inputs, num_items_in_batch=torch.tensor(50))
        full = model(**inputs, num_items_in_batch=torch.tensor(50), full_logits=True)
    supervised = inputs["labels"][:, 1:] != IGNORE_INDEX
    assert trimmed.logits.shape == (int(supervised.sum()), full.logits.shape[-1])
    torch.testing.assert_close(trimmed.logits, full.logits[:, :-1][supervised], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trimmed.loss, full.loss, atol=1e-6, rtol=1e-6)
