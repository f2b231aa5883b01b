"""Generation is checked against what the trained model itself predicts, for every fusion strategy.

"Cached equals uncached" passes when both are wrong (it did, when a transformers release renamed the
decoder layers' cache keyword and cross-attention decoding lost the image after the first token).
So each strategy is briefly trained through the real `train()` entry point, and then:
- greedy generation (batched, left-padded, KV cache; late fusion's logits mixed at the LM's output head included)
  reproduces, token for token, the argmax of a teacher-forced forward pass over its own output;
- two different images under the same caption prompt give different captions.
"""

from __future__ import annotations

import random

import pytest
import torch

from vlm.data.sample import Sample
from captions import SCENES, STRATEGIES
from greedy import assert_greedy_is_teacher_forced_argmax
from vlm.embedded.synthetic import caption, render_scene
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


def test_greedy_generation_equals_the_teacher_forced_argmax(trained: VLM):
    generated = assert_greedy_is_teacher_forced_argmax(trained, _samples())
    assert any(len(tokens) > 2 for tokens in generated), generated


@torch.no_grad()
def test_different_images_give_different_captions(trained: VLM):
    scenes = SCENES[:2]  # trained on; they differ in every attribute
    images = [render_scene(s, rng=random.Random(i)) for i, s in enumerate(scenes)]
    captions = [Pipeline(trained).generate([image], "Describe the image.", max_new_tokens=16) for image in images]
    assert captions[0] != captions[1], (captions, [caption(s) for s in scenes])
