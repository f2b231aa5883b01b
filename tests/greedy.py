"""Greedy generation checked against the model's own teacher-forced argmax (test_generation, test_real_backbones)."""

from __future__ import annotations

import torch

from vlm.data.collator import Collator
from vlm.data.sample import Sample
from vlm.factory import processor_for
from vlm.model import VLM


def generate_tokens(model: VLM, samples: list[Sample], max_new_tokens: int = 16) -> list[list[int]]:
    """Each sample's new tokens up to and including the first end token, from one left-padded batch."""
    batch = Collator(model.tokenizer.pad_token_id, "left")([processor_for(model)(s, for_generation=True) for s in samples])
    new = model.generate(**batch.generation_inputs(), max_new_tokens=max_new_tokens, do_sample=False)
    eos = model.lm.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    out = []
    for row in new.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        out.append(row[:end])
    return out


@torch.no_grad()
def assert_greedy_is_teacher_forced_argmax(model: VLM, samples: list[Sample], max_new_tokens: int = 16) -> list[list[int]]:
    """Generate greedily for `samples` in one batch, then check each sample's tokens are the argmax of one forward
    pass over the prompt and those tokens; returns the tokens."""
    generated = generate_tokens(model, samples, max_new_tokens)
    for sample, tokens in zip(samples, generated):
        prompt = processor_for(model)(sample, for_generation=True)
        ids = torch.cat([prompt["input_ids"], torch.tensor(tokens, dtype=torch.long)]).unsqueeze(0)
        logits = model(ids, torch.ones_like(ids), prompt["pixel_values"], full_logits=True).logits[0]
        start = prompt["input_ids"].shape[0] - 1  # the logit at position t predicts token t + 1
        argmax = logits[start:start + len(tokens)].argmax(-1).tolist()
        assert argmax == tokens, (
            f"{sample.id}: generated {model.tokenizer.decode(tokens)!r}, teacher-forced argmax "
            f"{model.tokenizer.decode(argmax)!r}"
        )
    return generated
