"""Load the causal LM and prepare its tokenizer: `<image>` token, chat template, padding."""

from __future__ import annotations

import logging

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Used only when the tokenizer ships no chat template of its own. ChatML, the format of
# Qwen / SmolLM / many instruct models: `<|im_start|>{role}\n{content}<|im_end|>\n` per message.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]


def load_language_model(
    spec: str, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Any AutoModelForCausalLM by hub id or local folder, with its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
    lm = AutoModelForCausalLM.from_pretrained(spec, trust_remote_code=trust_remote_code, dtype=torch.float32)
    return lm, tokenizer


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, image_token: str) -> str | None:
    """Add the image token, a chat template if there is none, and a pad token.

    Returns the end-of-turn token when the project's default template was applied (the LM
    must then also stop generating at it), else None.
    """
    added = [image_token]
    end_of_turn = None
    if not tokenizer.chat_template:
        logger.info("Tokenizer has no chat template: using the project's default (ChatML).")
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        added += [t for t in CHATML_TOKENS if t not in tokenizer.get_vocab()]
        end_of_turn = "<|im_end|>"
    tokenizer.add_special_tokens({"additional_special_tokens": added}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return end_of_turn


def fit_lm_to_tokenizer(lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, end_of_turn: str | None) -> None:
    """Grow the embeddings for added tokens and make generation stop at the end of a turn."""
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if end_of_turn is not None:
        eos = lm.generation_config.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        end_id = tokenizer.convert_tokens_to_ids(end_of_turn)
        if end_id not in eos:
            lm.generation_config.eos_token_id = eos + [end_id]
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
