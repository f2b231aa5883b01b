"""LoRA trains the rows of the tokens the project adds (image token, ChatML) and nothing else of the
vocabulary; those rows survive every way of saving; QLoRA's path does the same on CPU (minus NF4)."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from vlm.config import Config, LoraConfig, ModelConfig, TrainConfig
from vlm.data.collator import Collator
from vlm.data.sample import Sample
from vlm.factory import load, processor_for
from vlm.lm import new_token_ids
from vlm.model import VLM
from vlm.train.freezing import apply_stage
from vlm.train.lora import apply_lora, has_lora, load_adapter_folder, merge_lora, save_adapter, save_final
from vlm.train.optim import build_optimizer


@pytest.fixture(scope="module")
def untied_lm(backbones, tmp_path_factory):
    """The tiny LM with its output head untied from the input embedding (most 7B LMs are untied)."""
    path = tmp_path_factory.mktemp("untied_lm")
    lm = AutoModelForCausalLM.from_pretrained(backbones["lm"])
    lm.config.tie_word_embeddings = False
    lm.lm_head.weight = torch.nn.Parameter(lm.lm_head.weight.detach().clone() * 1.5)  # a head of its own
    lm.save_pretrained(path)
    AutoTokenizer.from_pretrained(backbones["lm"]).save_pretrained(path)
    return path


@pytest.fixture(params=["tied", "untied"])
def lm_path(request, backbones, untied_lm):
    return str(backbones["lm"]) if request.param == "tied" else str(untied_lm)


def build(backbones, lm, **lora):
    torch.manual_seed(0)
    config = ModelConfig(vision=str(backbones["vit"]), lm=lm).with_fusion("projector", type="mlp2x_gelu")
    model = VLM.from_config(config)
    train = TrainConfig(stage="finetune", lr=1e-2, lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, **lora))
    return model, train


def vocab_rows(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Copies of a plain (unwrapped or merged) LM's input-embedding and, when untied, output-head matrices."""
    lm = model.lm
    embed, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    return embed.detach().clone(), None if head is embed else head.detach().clone()


def end_of_turn_batch(model, image: str, n: int = 4) -> dict:
    """Short answers, each ending with `<|im_end|>` (the template closes every turn with it)."""
    processor = processor_for(model)
    samples = [
        Sample(f"s{i}", [{"role": "user", "content": "<image>\nWhat colour is it?"},
                         {"role": "assistant", "content": word}], [image])
        for i, word in enumerate(["red", "blue", "green", "red"][:n])
    ]
    batch = Collator(model.tokenizer.pad_token_id)([processor(s) for s in samples])
    return {k: getattr(batch, k) for k in ("input_ids", "attention_mask", "pixel_values", "labels")}


def train_steps(model, train, data, steps):
    optimizer = build_optimizer(model, Config(train=train))
    model.train()
    for _ in range(steps):
        model(**data).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def end_of_turn_loss(model, data) -> float:
    """Mean cross-entropy of the `<|im_end|>` targets alone."""
    end_id = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        logits = model(**{k: v for k, v in data.items() if k != "labels"}, full_logits=True).logits[:, :-1]
    targets = data["labels"][:, 1:]
    at = targets == end_id
    return float(torch.nn.functional.cross_entropy(logits[at], targets[at]))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "red.png"
    Image.new("RGB", (32, 32), (220, 30, 30)).save(path)
    return str(path)


def test_new_tokens_are_the_image_token_and_chatml_when_the_project_set_the_template(tiny_vlm):
    tokens = tiny_vlm.tokenizer.convert_ids_to_tokens(new_token_ids(tiny_vlm.tokenizer, "<image>"))
    assert sorted(tokens) == ["<image>", "<|im_end|>", "<|im_start|>"]
    tiny_vlm.tokenizer.chat_template = "{{ messages[0]['content'] }}"  # an LM with its own template
    assert tiny_vlm.tokenizer.convert_ids_to_tokens(new_token_ids(tiny_vlm.tokenizer, "<image>")) == ["<image>"]


def test_appended_rows_start_at_the_mean_of_the_vocabulary(backbones, untied_lm):
    for lm in (str(backbones["lm"]), str(untied_lm)):
        torch.manual_seed(0)
        model = VLM.from_config(ModelConfig(vision=str(backbones["vit"]), lm=lm))
        image_id = model.image_token_id
        for matrix in vocab_rows(model):
            if matrix is None:
                continue
            assert image_id == matrix.shape[0] - 1  # the one row the project appended
            torch.testing.assert_close(matrix[image_id], matrix[:-1].mean(0), atol=1e-5, rtol=0)


def test_under_lora_only_the_added_rows_change(backbones, lm_path, image):
    model, train = build(backbones, lm_path)
    embed_before, head_before = vocab_rows(model)
    new = new_token_ids(model.tokenizer, "<image>")
    apply_stage(model, train)
    train_steps(model, train, end_of_turn_batch(model, image), steps=4)
    embed_after, head_after = vocab_rows(merge_lora(model))
    others = torch.ones(embed_before.shape[0], dtype=torch.bool)
    others[new] = False
    assert torch.equal(embed_after[others], embed_before[others])  # bit-identical
    changed = (embed_after[new] - embed_before[new]).abs().amax(-1) > 0
    im_start, im_end = (model.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    assert changed[new.index(im_start)]  # read as input: the embedding row learns
    if head_before is None:
        assert changed[new.index(im_end)]  # tied: the one matrix also carries the output row
    else:
        assert torch.equal(head_after[others], head_before[others])
        head_changed = (head_after[new] - head_before[new]).abs().amax(-1) > 0
        assert head_changed[new.index(im_end)]  # emitted: its output-head row learns


def test_without_new_tokens_lora_leaves_every_row_alone(backbones, image):
    model, train = build(backbones, str(backbones["lm"]), train_new_tokens=False)
    embed_before, _ = vocab_rows(model)
    apply_stage(model, train)
    train_steps(model, train, end_of_turn_batch(model, image), steps=2)
    assert torch.equal(vocab_rows(merge_lora(model))[0], embed_before)


def test_lora_learns_to_end_the_turn_about_as_fast_as_full_finetune(backbones, image):
    """The symptom behind the LoRA underfit: the end-of-turn token's loss. With its rows training,
    LoRA brings it down nearly as far as a full fine-tune in the same steps; frozen, it cannot."""
    losses = {}
    for name in ("full", "lora", "lora_frozen_rows"):
        model, train = build(backbones, str(backbones["lm"]), train_new_tokens=name != "lora_frozen_rows")
        if name == "full":
            train = TrainConfig(stage="finetune", lr=train.lr)
        apply_stage(model, train)
        data = end_of_turn_batch(model, image)
        start = end_of_turn_loss(model, data)
        train_steps(model, train, data, steps=STEPS)
        losses[name] = (start, end_of_turn_loss(model, data))
    (full0, full), (lora0, lora), (_, frozen) = losses["full"], losses["lora"], losses["lora_frozen_rows"]
    assert abs(full0 - lora0) < 1e-4  # same starting model
    assert full < 0.25 * full0 and lora < 0.25 * lora0
    assert lora < full + 0.5
    assert frozen > 2 * lora


STEPS = 15


@pytest.mark.parametrize("quantize", [None, "4bit"])
def test_adapter_and_merged_folders_keep_the_trained_rows(backbones, lm_path, image, tmp_path, quantize):
    """Adapter-only and merged `final/` folders give the trained model's logits; with QLoRA's path
    (everything but the NF4 swap, which needs CUDA) as well."""
    model, train = build(backbones, lm_path, quantize=quantize)
    if quantize:
        apply_lora(model, train.lora, quantize_weights=False)  # the tower is frozen and the fusion trains by default
    else:
        apply_stage(model, train)
    data = end_of_turn_batch(model, image)
    train_steps(model, train, data, steps=3)
    delta = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
    assert delta and all(float(p.detach().abs().max()) > 0 for p in delta)
    inputs = {k: v for k, v in data.items() if k != "labels"}
    with torch.no_grad():
        expected = model(**inputs, full_logits=True).logits
    save_adapter(model, tmp_path / "adapter")
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).keys()
    assert any("trainable_tokens_delta" in k for k in keys)  # the rows travel in the adapter ...
    assert not any("base_layer" in k and ("embed_tokens" in k or "lm_head" in k) for k in keys)  # not whole matrices
    save_final(model, processor_for(model), tmp_path / "final", merge=True)
    assert not has_lora(model)
    with torch.no_grad():
        merged = VLM.from_pretrained(tmp_path / "final").eval()
        assert (merged(**inputs, full_logits=True).logits - expected).abs().max() <= 1e-4
        adapter = load_adapter_folder(tmp_path / "adapter").eval()
        assert (adapter(**inputs, full_logits=True).logits - expected).abs().max() <= 1e-4


def test_llava_hf_export_carries_the_trained_rows(backbones, tiny_clip, image, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from vlm.hub.export import export_llava_hf

    torch.manual_seed(0)
    model = VLM.from_config(ModelConfig(vision=f"hf:{tiny_clip}", lm=str(backbones["lm"])).with_fusion("projector", type="mlp2x_gelu"))
    embed_before, _ = vocab_rows(model)
    train = TrainConfig(stage="finetune", lr=1e-2, lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    apply_stage(model, train)
    train_steps(model, train, end_of_turn_batch(model, image), steps=2)
    save_final(model, processor_for(model), tmp_path / "final", merge=True)
    export_llava_hf(*load(tmp_path / "final"), tmp_path / "llava")
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava")
    exported = llava.get_input_embeddings().weight.detach()
    trained, _ = vocab_rows(model)
    new = new_token_ids(model.tokenizer, "<image>")
    assert torch.equal(exported, trained)
    assert not torch.equal(exported[new], embed_before[new])
