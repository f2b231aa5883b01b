"""Did fine-tuning keep the LM's chat? Text-only replies of the trained VLM against its base LM's.

On a fixed set of text-only chat prompts (no image; `CHAT_PROMPTS`, 120), the base model (the same backbones,
untrained fusion: with no image in the text, projector-style fusions and cross-attention with gates at
init are exactly the base LM) answers greedily. Two figures:
- `identical_replies`: the share of prompts the trained model answers with exactly the base's reply;
- `loss_on_base_replies`: the trained model's mean loss per token on the base's replies (teacher-forced),
  beside `base_loss_on_own_replies`, the base's own (its floor). A model that kept its chat stays close.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..data.collator import Collator
from ..data.sample import Sample
from ..model import VLM
from ..processor import VLMProcessor

_ASKS = ("What is {}?", "Explain {} in one sentence.", "Give me a fun fact about {}.", "Write a short poem about {}.",
         "Why is {} important to people?", "How would you describe {} to a child?")
_TOPICS = ("the sun", "water", "a cat", "the ocean", "music", "a computer", "the moon", "bread", "a tree", "rain",
           "a bicycle", "the internet", "chess", "a volcano", "honey", "a library", "the heart", "snow", "a rainbow",
           "electricity")
CHAT_PROMPTS: tuple[str, ...] = tuple(ask.format(topic) for topic in _TOPICS for ask in _ASKS)
"""120 fixed text-only prompts: six kinds of request about twenty everyday topics."""


@torch.no_grad()
def greedy_replies(model: VLM, processor: VLMProcessor, prompts: list[str], max_new_tokens: int = 32,
                   batch_size: int = 16) -> list[str]:
    """Each prompt as one user turn with no image, answered greedily (left-padded batches, as `vlm predict`)."""
    model.eval()
    collate = Collator(processor.tokenizer.pad_token_id, "left")
    replies: list[str] = []
    for start in range(0, len(prompts), batch_size):
        items = [processor(_turns(f"chat-{start + i}", p), for_generation=True)
                 for i, p in enumerate(prompts[start:start + batch_size])]
        replies += processor.decode(model.generate(**collate(items).generation_inputs(), max_new_tokens=max_new_tokens))
    return replies


@torch.no_grad()
def reply_loss(model: VLM, processor: VLMProcessor, prompts: list[str], replies: list[str], batch_size: int = 16) -> float:
    """Mean loss per token of `replies` (as the assistant turns answering `prompts`), teacher-forced."""
    model.eval()
    collate = Collator(processor.tokenizer.pad_token_id, "right")
    total, tokens = 0.0, 0
    pairs = [(p, r) for p, r in zip(prompts, replies) if r.strip()]  # an empty reply has nothing to score
    for start in range(0, len(pairs), batch_size):
        items = [processor(_turns(f"chat-{start + i}", p, r)) for i, (p, r) in enumerate(pairs[start:start + batch_size])]
        batch = collate(items)
        count = batch.supervised_tokens()
        out = model(**batch.model_inputs(), num_items_in_batch=torch.tensor(count))
        total, tokens = total + float(out.loss) * count, tokens + count
    return total / max(tokens, 1)


def retention(model: VLM, base: VLM, processor: VLMProcessor, prompts: list[str] | None = None,
              max_new_tokens: int = 32, batch_size: int = 16) -> dict[str, Any]:
    """`model`'s text-only chat against `base`'s on `prompts` (default `CHAT_PROMPTS`); both share `processor`."""
    prompts = list(prompts or CHAT_PROMPTS)
    base_replies = greedy_replies(base, processor, prompts, max_new_tokens, batch_size)
    replies = greedy_replies(model, processor, prompts, max_new_tokens, batch_size)
    return {
        "prompts": len(prompts),
        "identical_replies": sum(a == b for a, b in zip(replies, base_replies)) / len(prompts),
        "loss_on_base_replies": reply_loss(model, processor, prompts, base_replies, batch_size),
        "base_loss_on_own_replies": reply_loss(base, processor, prompts, base_replies, batch_size),
        "examples": [{"prompt": p, "base": b, "trained": r} for p, b, r in list(zip(prompts, base_replies, replies))[:3]],
    }


def base_model(model: VLM) -> VLM:
    """The untrained VLM of `model`'s backbones: its LM as loaded before any training (`model.lm` must still
    be reachable: a local folder, or a hub id in the cache)."""
    return VLM.from_config(replace(model.config, pretrained=None, init_from=None)).eval()


def _turns(sample_id: str, prompt: str, reply: str | None = None) -> Sample:
    messages = [{"role": "user", "content": prompt}]
    if reply is not None:
        messages.append({"role": "assistant", "content": reply})
    return Sample(id=sample_id, messages=messages, images=[])
