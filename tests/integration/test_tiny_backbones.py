"""The embedded backbones must load through the same code paths as hub models, unchanged."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from vlm.embedded.pretrain import HEADS, IMAGE_SIZE, vit_heldout_pool
from vlm.embedded.synthetic import text_corpus
from vlm.embedded.tiny_backbones import VIT_ARGS, lm_loss, make_tiny_backbones

SEED = 3


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    out = tmp_path_factory.mktemp("backbones")
    paths = make_tiny_backbones(out, vit_steps=12, lm_steps=30, seed=SEED)
    report = json.loads((out / "pretraining.json").read_text())
    return paths, report


def test_vit_loads_through_local_dir_with_saved_weights(backbones) -> None:
    paths, report = backbones
    model = timm.create_model("local-dir:" + str(paths["vit"]), pretrained=True, num_classes=0).eval()
    classifier = timm.create_model("local-dir:" + str(paths["vit"]), pretrained=True).eval()
    assert classifier.num_classes == sum(len(v) for v in HEADS.values())
    assert model.num_classes == 0 and model.patch_embed.patch_size == (VIT_ARGS["patch_size"],) * 2
    assert model.cls_token is not None and model.num_prefix_tokens == 1

    config = resolve_data_config(model=model)
    assert tuple(config["input_size"]) == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert config["crop_pct"] == 1.0
    assert tuple(config["mean"]) == tuple(report["vit"]["mean"]) and tuple(config["std"]) == tuple(report["vit"]["std"])

    # Reloaded classifier reproduces the accuracy measured on the in-memory model before saving.
    x, y, _ = vit_heldout_pool(SEED)
    mean, std = torch.tensor(config["mean"]).view(1, 3, 1, 1), torch.tensor(config["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        pixels = (x.float() / 255 - mean) / std
        logits = torch.cat([classifier(pixels[i : i + 256]) for i in range(0, len(x), 256)])
        feats = model.forward_features(pixels[:8])
    assert torch.allclose(feats, classifier.forward_features(pixels[:8]))
    assert feats.shape == (8, 1 + (IMAGE_SIZE // VIT_ARGS["patch_size"]) ** 2, VIT_ARGS["embed_dim"])
    start = 0
    for g, (name, classes) in enumerate(HEADS.items()):
        valid = y[:, g] != -100
        pred = logits[:, start : start + len(classes)].argmax(-1)
        start += len(classes)
        acc = (pred == y[:, g])[valid].float().mean().item()
        assert acc == pytest.approx(report["vit"]["heldout_accuracy"]["head"][name], abs=2e-3)


def test_vit_preprocessing_keeps_whole_image(backbones) -> None:
    paths, _ = backbones
    model = timm.create_model("local-dir:" + str(paths["vit"]), pretrained=True, num_classes=0)
    config = resolve_data_config(model=model)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
    tensor = create_transform(**config, is_training=False)(image)
    mean, std = torch.tensor(config["mean"]).view(3, 1, 1), torch.tensor(config["std"]).view(3, 1, 1)
    expected = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - mean) / std
    assert torch.allclose(tensor, expected, atol=1e-5), "no crop or resize at the native size"


def test_vit_pretraining_reduces_loss(backbones) -> None:
    vit = backbones[1]["vit"]
    assert vit["final_loss"] < vit["first_loss"]
    assert vit["heldout_accuracy"]["head"]["colour"] > 1 / len(HEADS["colour"])


def test_lm_and_tokenizer_load_through_auto_classes(backbones) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths, report = backbones
    tok = AutoTokenizer.from_pretrained(paths["lm"])
    model = AutoModelForCausalLM.from_pretrained(paths["lm"]).eval()
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model.config.vocab_size == len(tok) == report["lm"]["vocab_size"]
    assert 900 <= len(tok) <= 2048
    assert tok.bos_token == tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    assert getattr(tok, "chat_template", None) is None
    for special in ("<|im_start|>", "<|im_end|>"):
        assert special in tok.all_special_tokens
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    ids = tok("<|im_start|>user\nWhat colour is the circle?<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and tok.convert_tokens_to_ids("<|im_end|>") in ids

    # Reloaded LM reproduces the held-out loss measured on the in-memory model before saving.
    heldout = text_corpus(1500, SEED + 10_000)
    assert lm_loss(model, tok, heldout) == pytest.approx(report["lm"]["heldout_loss"], abs=1e-4)


@pytest.mark.parametrize(
    "text",
    [
        "What colour is the circle? red",
        "  leading spaces,\ttabs\nand newlines\n\n",
        "Unseen words: zygote quixotic 1234 #$%&*",
        "unicode: héllo wörld — 你好 🙂",
        "<|im_start|>user\nhi<|im_end|>",
    ],
)
def test_tokenizer_round_trips_exactly(backbones, text: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(backbones[0]["lm"])
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.unk_token_id is None, "byte-level BPE never needs an unknown token"


def test_lm_pretraining_learns_the_corpus(backbones) -> None:
    lm = backbones[1]["lm"]
    assert lm["final_loss"] < lm["first_loss"]
    assert lm["heldout_loss"] < 0.7 * lm["log_vocab"] < lm["heldout_loss_before"]
    assert math.isclose(lm["log_vocab"], math.log(lm["vocab_size"]))


def test_siglip_tower_loads_through_load_vision_encoder_with_its_weights(backbones) -> None:
    from transformers import SiglipVisionModel

    from vlm.embedded.tiny_siglip import SIGLIP_CONFIG
    from vlm.encoders import load_vision_encoder

    paths, report = backbones
    encoder = load_vision_encoder(str(paths["siglip"]))  # a local transformers folder, loaded as hub ids are
    assert encoder.library == "transformers" and encoder.model.config.model_type == "siglip_vision_model"
    side = IMAGE_SIZE // SIGLIP_CONFIG["patch_size"]
    assert encoder.num_patches == side * side and encoder.hidden_size == SIGLIP_CONFIG["hidden_size"]

    # Its image processor normalises with the statistics it was pre-trained with, with no resize at 64 px.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
    pixels = encoder.image_transform()(image)
    mean = torch.tensor(report["siglip"]["mean"]).view(3, 1, 1)
    std = torch.tensor(report["siglip"]["std"]).view(3, 1, 1)
    expected = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - mean) / std
    assert torch.allclose(pixels, expected, atol=1e-5)

    reference = SiglipVisionModel.from_pretrained(paths["siglip"]).eval()
    with torch.no_grad():
        ours = encoder(pixels[None])
        theirs = reference(pixel_values=pixels[None], output_hidden_states=True).hidden_states[-2]
    assert torch.equal(ours, theirs)
    assert report["siglip"]["steps"] == 12 and report["siglip"]["final_loss"] < report["siglip"]["first_loss"]
