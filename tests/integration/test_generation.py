"""Generation is checked against what the trained model itself predicts, for every fusion strategy.

"Cached equals uncached" passes when both are wrong (it did, when a transformers release renamed the
decoder layers' cache keyword and cross-attention decoding lost the image after the first token).
So each strategy is briefly trained through the real `train()` entry point, and then:
- greedy generation (batched, left-padded, KV cache; late fusion's own decoding loop included)
  reproduces, token for token, the argmax of a teacher-forced forward pass over its own output;
- two different images under the same caption prompt give different captions.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from vlm.config import load_config
from vlm.data.collator import Collator
from vlm.data.sample import Sample
from vlm.embedded.synthetic import Scene, caption, render_scene
from vlm.factory import processor_for
from vlm.pipeline import Pipeline
from vlm.model import VLM
from vlm.train import train

STRATEGIES = {
    "projector": ["model.fusion=projector", "model.projector.type=mlp2x_gelu"],
    "resampler": ["model.fusion=resampler", "model.resampler.latents=8"],
    "early": ["model.fusion=early"],
    "cross_attention": ["model.fusion=cross_attention", "model.cross_attention.every_n_layers=2"],
    # The product, as the fusion benchmark runs late fusion: with the default mixture the question-blind
    # image head and the LM take turns, and 120 steps do not make captions depend on the image (both
    # images captioned 'a large red circle on the left.'). Decoding runs the same loop for either.
    "late": ["model.fusion=late", "model.late.combine=product"],
}
SCENES = [Scene("red", "circle", "large", 1, "left"), Scene("blue", "square", "small", 1, "right"),
          Scene("green", "triangle", "large", 2), Scene("yellow", "diamond", "small", 3),
          Scene("purple", "circle", "small", 1, "top"), Scene("orange", "square", "large", 1, "bottom"),
          Scene("red", "triangle", "small", 3), Scene("blue", "diamond", "large", 2)]
PROMPTS = ["<image>\nDescribe the image.", "<image>\nWhat colour is the shape?",
           "<image>\nWhat is in this picture?", "<image>\nHow many objects are there?"]


@pytest.fixture(scope="module")
def captions_file(tmp_path_factory) -> Path:
    """Eight scenes of distinct colour / shape / size / count, each asked for a caption and a colour: small enough that 120 steps
    learn them, so the generated text must depend on the image."""
    root = tmp_path_factory.mktemp("gen-data")
    records = []
    for i, scene in enumerate(SCENES):
        render_scene(scene, rng=random.Random(i)).save(root / f"{i}.png")
        records.append({"id": f"c{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": caption(scene)},
            {"from": "human", "value": "What colour is the shape?"}, {"from": "gpt", "value": scene.colour}]})
    (root / "train.json").write_text(json.dumps(records))
    return root / "train.json"


@pytest.fixture(scope="module", params=list(STRATEGIES))
def trained(request, backbones, captions_file, tmp_path_factory) -> VLM:
    out = tmp_path_factory.mktemp(f"gen-{request.param}")
    config = load_config(None, [
        f"model.vision={backbones['vit']}", f"model.lm={backbones['lm']}", *STRATEGIES[request.param],
        f"data.train_files=[{captions_file}]", "train.stage=finetune", "train.max_steps=120",
        "train.batch_size=8", "train.lr=1e-3", "train.fusion_lr=3e-3", "train.warmup_steps=5",
        "train.report_to=none", "train.seed=0", f"output_dir={out}",
    ])
    torch.manual_seed(0)
    train(config)
    return VLM.from_pretrained(out / "final").eval()


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
