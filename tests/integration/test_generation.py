"""Generation is checked against what the trained model itself predicts, for every fusion strategy.

"Cached equals uncached" passes when both are wrong (it did, when a transformers release renamed the
decoder layers' cache keyword and cross-attention decoding lost the image after the first token).
So each strategy is briefly trained through the real `train()` entry point, and then:
- greedy generation (batched, left-padded, KV cache; late fusion's own decoding loop included)
  reproduces, token for token, the argmax of a teacher-forced forward pass over its own output;
- two different images under the same caption prompt give different captions.
"""

from __future__ import annotations

import random

import pytest
import torch

from vlm.data.collator import Collator
from vlm.data.sample import Sample
from captions import SCENES, STRATEGIES
from vlm.embedded.synthetic import caption, render_scene
from vlm.factory import processor_for
from vlm.pipeline import Pipeline
from vlm.model import VLM

PROMPTS = ["<image>\nDescribe the image.", "<image>\nWhat colour is the shape?",
           "<image>\nWhat is in this picture?", "<image>\nHow many objects are there?"]


@pytest.fixture(scope="module", params=list(STRATEGIES))
def trained(request, train_captioner) -> VLM:
    return VLM.from_pretrained(train_captioner(STRATEGIES[request.param]) / "final").eval()


def _samples() -> list[Sample]:
    return [Sample(f"s{i}", [{"role": "user", "content": p}], [render_scene(s)])
            for i, (p, s) in enumerate(zip(PROMPTS, SCENES[::2]))]


def _generate_tokens(model: VLM, samples: list[Sample], max_new_tokens: int = 16) -> list[list[int]]:
    """Each sample's new tokens up to and including the first end token, from one left-padded batch."""
    batch = Collator(model.tokenizer.pad_token_id, "left")([processor_for(model)(s, for_generation=True) for s in samples])
    embeds, features = model.embed(batch["input_ids"], batch["pixel_values"])
    new = model.fusion.lm_generate(
        model.lm, inputs_embeds=embeds, attention_mask=batch["attention_mask"], image_features=features,
        image_mask=batch["input_ids"] == model.image_token_id, max_new_tokens=max_new_tokens, do_sample=False,
    )
    new = getattr(new, "sequences", new)
    eos = model.lm.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    out = []
    for row in new.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        out.append(row[:end])
    return out


@torch.no_grad()
def test_greedy_generation_equals_the_teacher_forced_argmax(trained: VLM):
    samples = _samples()
    generated = _generate_tokens(trained, samples)
    assert any(len(tokens) > 2 for tokens in generated), generated
    for sample, tokens in zip(samples, generated):
        prompt = processor_for(trained)(sample, for_generation=True)
        ids = torch.cat([prompt["input_ids"], torch.tensor(tokens, dtype=torch.long)]).unsqueeze(0)
        logits = trained(ids, torch.ones_like(ids), prompt["pixel_values"], full_logits=True).logits[0]
        start = prompt["input_ids"].shape[0] - 1  # the logit at position t predicts token t + 1
        argmax = logits[start:start + len(tokens)].argmax(-1).tolist()
        assert argmax == tokens, (
            f"{sample.id}: generated {trained.tokenizer.decode(tokens)!r}, teacher-forced argmax "
            f"{trained.tokenizer.decode(argmax)!r}"
        )


@torch.no_grad()
def test_different_images_give_different_captions(trained: VLM):
    scenes = SCENES[:2]  # trained on; they differ in every attribute
    images = [render_scene(s, rng=random.Random(i)) for i, s in enumerate(scenes)]
    captions = [Pipeline(trained).generate([image], "Describe the image.", max_new_tokens=16) for image in images]
    assert captions[0] != captions[1], (captions, [caption(s) for s in scenes])
