"""Load the causal LM (transformers folder, hub id or GGUF file) and prepare its tokenizer: `<image>` token,
chat template, padding."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase,
)

from .config_parsing import ConfigError
from .data.content import ensure_parts_template
from .weights import WeightsError, load_exactly

logger = logging.getLogger(__name__)

# Used only when the tokenizer ships no chat template of its own. ChatML, the format of
# Qwen / SmolLM / many instruct models: `<|im_start|>{role}\n{content}<|im_end|>\n` per message.
# `content` is a string (this project's samples) or a list of parts, as transformers and serving stacks
# send it: `{"type": "text", "text": ...}` renders as its text, `{"type": "image"}` as the image token,
# parts joined by newlines, so `[image, text]` renders exactly as the string `"<image>\n" + text`.
_CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if not loop.first -%}{{ '\n' }}{%- endif -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] == 'image' -%}{{ @IMAGE@ }}"
    "{%- else -%}{{ raise_exception('Content parts of type ' + part['type'] + ' are not supported; "
    "use text and image parts.') }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
# What earlier versions wrote into saved folders: string content only. Loading such a folder upgrades it.
LEGACY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]


def chat_template(image_token: str) -> str:
    """The project's ChatML template, with `image_token` as what an image part renders to."""
    literal = "'" + image_token.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return _CHATML.replace("@IMAGE@", literal)


def upgrade_chat_template(tokenizer: PreTrainedTokenizerBase, image_token: str) -> None:
    """A folder saved with the old string-only template gets the current one; an LM's own string-only
    template gets the preamble that renders list-of-parts content as training does (vlm/data/content.py)."""
    if tokenizer.chat_template == LEGACY_CHAT_TEMPLATE:
        tokenizer.chat_template = chat_template(image_token)
    ensure_parts_template(tokenizer, image_token)


def gguf_source(spec: str) -> dict[str, str]:
    """`{"gguf_file": name}` when `spec` is a local folder with no config.json holding one `.gguf` file (a
    llama.cpp download), else `{}`: the keyword that makes transformers' own loaders read the GGUF file."""
    path = Path(spec)
    if not path.is_dir() or (path / "config.json").is_file():
        return {}
    found = sorted(p.name for p in path.glob("*.gguf"))
    if len(found) > 1:
        raise ConfigError(
            f"model.lm='{spec}' holds {len(found)} .gguf files ({', '.join(found)}); "
            "point model.lm at a folder with exactly one."
        )
    return {"gguf_file": found[0]} if found else {}


def load_lm_tokenizer(spec: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The LM's tokenizer (from its GGUF file's metadata for a GGUF folder), chat template included."""
    return AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code, **gguf_source(spec))


def load_lm_config(spec: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The LM's config without its weights (a GGUF folder's from the file's metadata)."""
    return AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code, **gguf_source(spec))


def load_language_model(
    spec: str, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Any AutoModelForCausalLM by hub id or local folder (a transformers folder, or a folder holding one
    `.gguf` file, dequantised to float32 by transformers' GGUF loader), with its tokenizer."""
    source = gguf_source(spec)
    if not source:
        tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
        lm = AutoModelForCausalLM.from_pretrained(spec, trust_remote_code=trust_remote_code, dtype=torch.float32)
        return lm, tokenizer
    where = f"model.lm='{spec}' ({source['gguf_file']})"
    try:
        tokenizer = load_lm_tokenizer(spec, trust_remote_code)
        lm = AutoModelForCausalLM.from_pretrained(
            spec, trust_remote_code=trust_remote_code, dtype=torch.float32, **source
        )
    except Exception as err:  # the GGUF reader raises many kinds (ValueError, KeyError, struct.error, ...)
        said = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{where} does not load through transformers' GGUF reader: {said}") from None
    try:
        return dequantized_copy(lm, where), tokenizer
    except WeightsError as err:
        raise ConfigError(str(err)) from None


def dequantized_copy(lm: PreTrainedModel, source: str) -> PreTrainedModel:
    """The same weights in a plain model of the same config.

    transformers loads a GGUF file's weights dequantised but leaves the model flagged as GGUF-quantised
    (`config.quantization_config`, `hf_quantizer`), and `save_pretrained` refuses such a model; a model built
    from the config without that flag, holding every tensor, saves and trains like any other.
    source: names the file in the one-line error when a tensor does not fit (`vlm.weights.load_exactly`).
    """
    config = copy.deepcopy(lm.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    load_exactly(plain, lm.state_dict(), source)
    plain.generation_config = copy.deepcopy(lm.generation_config)
    return plain


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, image_token: str) -> str | None:
    """Add the image token, a chat template if there is none, and a pad token.

    Tokens the vocabulary already has (an instruct LM's own `<|im_start|>` / `<|im_end|>`) are reused, never
    added again, and the LM's own chat template (with its default system prompt, if any) is kept; the log says
    what was added and what reused. Returns the end-of-turn token when the project's default template was
    applied (the LM must then also stop generating at it), else None.
    """
    vocab = tokenizer.get_vocab()
    wanted = [image_token]
    end_of_turn = None
    if not tokenizer.chat_template:
        logger.info("Tokenizer has no chat template: using the project's default (ChatML).")
        tokenizer.chat_template = chat_template(image_token)
        wanted += CHATML_TOKENS
        end_of_turn = "<|im_end|>"
    elif ensure_parts_template(tokenizer, image_token):
        logger.info("Tokenizer has its own chat template, for string content only: using it, with list-of-parts "
                    "content rendered as the data readers render it (vlm/data/content.py).")
    else:
        logger.info("Tokenizer has its own chat template: using it as it is.")
    added = [t for t in wanted if t not in vocab]
    reused = [t for t in CHATML_TOKENS if t in vocab and t in tokenizer.chat_template]
    # The image token is always registered as special (one token however the text around it splits).
    special = [image_token, *(t for t in added if t != image_token)]
    tokenizer.add_special_tokens({"additional_special_tokens": special}, replace_extra_special_tokens=False)
    logger.info(
        "Tokenizer: added %s to the %d-token vocabulary%s.", ", ".join(added) or "nothing", len(vocab),
        f"; already there, reused: {', '.join(reused)}" if reused else "",
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return end_of_turn


def new_token_ids(tokenizer: PreTrainedTokenizerBase, image_token: str) -> list[int]:
    """Ids of the tokens this project brings to the LM: the image token, and ChatML's when the
    project supplied the chat template. A base LM has usually never been trained on them, even when
    its vocabulary lists them (the tiny quickstart LM's does): their rows must train for the model to
    read a turn boundary and, above all, to emit `<|im_end|>` and stop (docs/lora.md)."""
    tokens = [image_token]
    if tokenizer.chat_template == chat_template(image_token):
        tokens += CHATML_TOKENS
    return sorted({tokenizer.convert_tokens_to_ids(t) for t in tokens})


def fit_lm_to_tokenizer(lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, end_of_turn: str | None) -> None:
    """Grow the embeddings for added tokens and make generation stop at the end of a turn.

    Appended rows start at the mean of the existing rows (transformers' `mean_resizing`: the mean
    plus noise of 1e-9 times the rows' covariance), in the input embedding and, when untied, the
    output head. A random row has a logit unrelated to anything the LM learnt, and under LoRA it
    would stay that way; the mean row predicts an average logit and reads as an average token.
    """
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    if end_of_turn is not None:
        eos = lm.generation_config.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        end_id = tokenizer.convert_tokens_to_ids(end_of_turn)
        if end_id not in eos:
            lm.generation_config.eos_token_id = eos + [end_id]
    lm.generation_config.pad_token_id = tokenizer.pad_token_id


# Dotted paths of the decoder layer list in common architectures, tried in order.
LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma, Phi-3, SmolLM
    "model.language_model.layers",  # multimodal wrappers around a text decoder
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "model.decoder.layers",  # OPT
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "transformer.blocks",  # MPT
    "transformer.layers",
    "layers",
)


def _resolve(root: nn.Module, path: str) -> nn.Module | None:
    node: Any = root
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node if isinstance(node, nn.Module) else None


def find_decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The ModuleList holding the decoder layers, located by known paths, else by size."""
    n_layers = getattr(lm.config.get_text_config(), "num_hidden_layers", None) if hasattr(lm, "config") else None
    for path in LAYER_PATHS:
        found = _resolve(lm, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0 and (n_layers is None or len(found) == n_layers):
            return found
    candidates = [m for m in lm.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if n_layers and candidates:
        return candidates[0]
    raise ValueError(
        f"Cannot find the decoder layers of {type(lm).__name__}; add its layer-list path to LAYER_PATHS "
        "in vlm/lm.py."
    )


def shard_units(lm: nn.Module) -> list[nn.Module]:
    """The LM's FSDP units: its decoder layers (the root holds embeddings, final norm and head)."""
    return list(find_decoder_layers(lm))
