"""The llava-hf export must load in plain transformers and compute exactly what our model computes."""

import shutil

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration, LlavaProcessor

from vlm.cli import main
from vlm.config import ModelConfig
from vlm.data.collator import Collator
from vlm.data.sample import Sample
from vlm.factory import processor_for, save
from vlm.pipeline import Pipeline
from vlm.hub.export import export_llava_hf
from vlm.lm import LEGACY_CHAT_TEMPLATE
from vlm.model import VLM


@pytest.fixture(scope="module")
def exported(backbones, tiny_clip, tmp_path_factory):
    torch.manual_seed(0)
    model = VLM.from_config(ModelConfig(vision=f"hf:{tiny_clip}", lm=str(backbones["lm"])).with_fusion("projector", type="mlp2x_gelu"))
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.normal_(0, 0.05)
    root = tmp_path_factory.mktemp("export")
    save(model, processor_for(model), root / "ours")
    assert main(["export", "--model", str(root / "ours"), "--format", "llava-hf", "--out", str(root / "llava")]) == 0
    return VLM.from_pretrained(root / "ours").eval(), root / "llava"


def test_transformers_llava_gives_our_logits_and_tokens(exported, tmp_path):
    ours, folder = exported
    llava = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = LlavaProcessor.from_pretrained(folder)
    image = Image.new("RGB", (48, 40), (200, 60, 30))
    image.save(tmp_path / "im.png")
    sample = Sample("s", [{"role": "user", "content": "<image>\nWhat colour is it?"}], [str(tmp_path / "im.png")])
    batch = Collator(ours.tokenizer.pad_token_id, "left")([processor_for(ours)(sample, for_generation=True)])

    # The exported processor alone (chat template + image expansion) builds the same inputs.
    prompt = processor.apply_chat_template(sample.messages, add_generation_prompt=True, tokenize=False)
    theirs = processor(images=image, text=prompt, return_tensors="pt")
    assert theirs["input_ids"].tolist() == batch.input_ids.tolist()
    torch.testing.assert_close(theirs["pixel_values"], batch.pixel_values)

    with torch.no_grad():
        expected = ours(batch.input_ids, batch.attention_mask, batch.pixel_values).logits
        got = llava(**theirs).logits
    assert (got - expected).abs().max().item() <= 1e-4

    ours_text = processor_for(ours).decode(ours.generate(**batch.generation_inputs(), max_new_tokens=8,
                                                         min_new_tokens=8))
    new = llava.generate(**theirs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    theirs_text = processor.batch_decode(new[:, theirs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert [t.strip() for t in theirs_text] == ours_text


def test_transformers_message_format_gives_the_same_ids_and_answer(exported):
    """transformers users send content as a list of parts; the exported template must take it (issue 12)."""
    ours, folder = exported
    processor = AutoProcessor.from_pretrained(folder)
    llava = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    image = Image.new("RGB", (40, 48), (20, 160, 90))
    question = "What colour is it?"
    structured = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    plain = [{"role": "user", "content": f"<image>\n{question}"}]

    inputs = processor.apply_chat_template(
        structured, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    prompt = processor.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    assert processor.apply_chat_template(structured, add_generation_prompt=True, tokenize=False) == prompt
    expected = processor(images=image, text=prompt, return_tensors="pt")
    assert inputs["input_ids"].tolist() == expected["input_ids"].tolist()
    assert inputs["input_ids"][0].tolist().count(llava.config.image_token_index) == llava.config.image_seq_length
    torch.testing.assert_close(inputs["pixel_values"], expected["pixel_values"])

    new = llava.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    theirs = processor.decode(new[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert theirs == Pipeline(ours).generate([image], question, max_new_tokens=8, min_new_tokens=8)
    assert theirs, "eight greedy tokens decode to some text"

    # The saved VLM folder's own tokenizer takes both forms too, and renders them identically.
    tokenizer = AutoTokenizer.from_pretrained(folder.parent / "ours")
    text_only = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    assert tokenizer.apply_chat_template(text_only, add_generation_prompt=True, tokenize=False) == prompt


def test_an_lm_template_that_takes_only_strings_is_kept_with_a_warning(exported, tmp_path, caplog):
    ours, _ = exported
    own = ours.tokenizer.chat_template
    ours.tokenizer.chat_template = LEGACY_CHAT_TEMPLATE  # stands for an LM's own string-only template
    try:
        export_llava_hf(ours, processor_for(ours), tmp_path / "llava")
    finally:
        ours.tokenizer.chat_template = own
    assert AutoProcessor.from_pretrained(tmp_path / "llava").chat_template == LEGACY_CHAT_TEMPLATE
    assert "must pass content as a string containing <image>" in caplog.text


def test_a_folder_saved_with_the_old_string_only_template_takes_parts_once_loaded(exported, tmp_path):
    _, folder = exported
    old = tmp_path / "old"
    shutil.copytree(folder.parent / "ours", old)
    (old / "chat_template.jinja").write_text(LEGACY_CHAT_TEMPLATE)
    assert AutoTokenizer.from_pretrained(old).chat_template == LEGACY_CHAT_TEMPLATE
    tokenizer = VLM.from_pretrained(old).tokenizer
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    plain = [{"role": "user", "content": "<image>\nHi"}]
    assert tokenizer.apply_chat_template(parts, tokenize=False) == tokenizer.apply_chat_template(plain, tokenize=False)


def test_non_llava_shapes_are_refused_with_the_reason(backbones, tmp_path, capsys):
    model = VLM.from_config(ModelConfig(vision=str(backbones["vit"]), lm=str(backbones["lm"])))
    save(model, processor_for(model), tmp_path / "timm")
    assert main(["export", "--model", str(tmp_path / "timm"), "--format", "llava-hf", "--out", str(tmp_path / "x")]) == 2
    assert "needs a transformers vision tower" in capsys.readouterr().err


def test_tiny_siglip_tower_exports_to_llava_with_equal_logits(backbones, tmp_path):
    """The embedded SigLIP tower (no CLS token: Llava's `full` strategy) takes the same export path as hub ones."""
    torch.manual_seed(0)
    model = VLM.from_config(ModelConfig(vision=str(backbones["siglip"]), lm=str(backbones["lm"]))).eval()
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.normal_(0, 0.05)
    save(model, processor_for(model), tmp_path / "ours")
    assert main(["export", "--model", str(tmp_path / "ours"), "--format", "llava-hf", "--out", str(tmp_path / "llava")]) == 0
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    processor = LlavaProcessor.from_pretrained(tmp_path / "llava")
    assert llava.config.vision_config.model_type == "siglip_vision_model"
    assert llava.config.vision_feature_select_strategy == "full" and llava.config.image_seq_length == 64

    image = Image.new("RGB", (64, 64), (30, 60, 200))
    image.save(tmp_path / "im.png")
    sample = Sample("s", [{"role": "user", "content": "<image>\nWhat shape is it?"}], [str(tmp_path / "im.png")])
    batch = Collator(model.tokenizer.pad_token_id, "left")([processor_for(model)(sample, for_generation=True)])
    prompt = processor.apply_chat_template(sample.messages, add_generation_prompt=True, tokenize=False)
    theirs = processor(images=image, text=prompt, return_tensors="pt")
    assert theirs["input_ids"].tolist() == batch.input_ids.tolist()
    with torch.no_grad():
        expected = model(batch.input_ids, batch.attention_mask, batch.pixel_values).logits
        got = llava(**theirs).logits
    assert (got - expected).abs().max().item() <= 1e-4
