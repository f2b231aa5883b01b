"""LoRA through peft: what trains, merged == adapter logits, saving both ways, QLoRA without CUDA."""

import json

import pytest
import torch

from vlm.config import Config, LoraConfig, TrainConfig, load_config
from vlm.data.collator import Collator
from vlm.data.formats import read_samples
from vlm.factory import processor_for
from vlm.model import VLM
from vlm.train.freezing import apply_stage
from vlm.train.lora import has_lora, load_adapter_folder, save_adapter, save_final
from vlm.train.optim import build_optimizer


def lora_model(model_config, **lora):
    torch.manual_seed(0)
    model = VLM.from_config(model_config)
    train = TrainConfig(stage="finetune", lr=5e-3, lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, **lora))
    apply_stage(model, train)
    return model, train


def batch(model, synthetic, n=8):
    samples = read_samples(synthetic["train"])[0][:n]
    return Collator(model.tokenizer.pad_token_id)([processor_for(model)(s) for s in samples])


def inputs(b):
    return {k: getattr(b, k) for k in ("input_ids", "attention_mask", "pixel_values", "labels")}


def test_lora_lowers_loss_and_only_adapters_and_fusion_change(model_config, synthetic):
    model, train = lora_model(model_config)
    assert has_lora(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, Config(train=train))
    data = inputs(batch(model, synthetic))
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0] * 0.9
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k or "trainable_tokens_delta" in k or k.startswith("fusion.") for k in changed)
    assert any(k.startswith("fusion.") for k in changed) and any("lora_B" in k for k in changed)
    lm_linear = [k for k in before if k.startswith("lm.") and "lora_" not in k and k.endswith("base_layer.weight")]
    assert lm_linear and not changed & set(lm_linear)  # the LM's own weights stay put
    assert not any(k.startswith("vision.") for k in changed)


def test_default_targets_are_the_lms_linears_never_the_tower(model_config):
    model, _ = lora_model(model_config)
    adapted = {n for n, _ in model.named_modules() if n.endswith("lora_A")}
    assert adapted and all(n.startswith("lm.") for n in adapted)
    assert not any("lm_head" in n for n in adapted)
    with pytest.raises(ValueError, match="LM only"):
        lora_model(model_config, target_modules=["vision.blocks.0.attn.qkv"])


def test_merged_model_matches_adapter_and_loads_without_peft(model_config, synthetic, tmp_path):
    model, _ = lora_model(model_config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # a trained adapter is not the identity
    model.eval()
    data = inputs(batch(model, synthetic, 4))
    with torch.no_grad():
        adapter_logits = model(**data).logits
    save_adapter(model, tmp_path / "adapter")
    save_final(model, processor_for(model), tmp_path / "final", merge=True)
    assert not has_lora(model)
    plain = VLM.from_pretrained(tmp_path / "final").eval()
    assert not hasattr(plain.lm, "peft_config")
    with torch.no_grad():
        assert (plain(**data).logits - adapter_logits).abs().max() <= 1e-4
        reloaded = load_adapter_folder(tmp_path / "adapter").eval()
        assert (reloaded(**data).logits - adapter_logits).abs().max() <= 1e-4
    from vlm.cli import main

    assert main(["export", "--merge-lora", "--model", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        merged = VLM.from_pretrained(tmp_path / "merged").eval()
        assert (merged(**data).logits - adapter_logits).abs().max() <= 1e-4


def test_an_adapter_folder_keeps_the_tiling_through_merge_lora(model_config, tmp_path):
    """`export.merge_lora: false` with data.tiling: the adapter folder records its processor (tiling included), and
    `vlm export --merge-lora` makes a folder that tiles as training did."""
    from vlm.cli import main
    from vlm.factory import load

    model, _ = lora_model(model_config)
    save_final(model, processor_for(model, max_tiles=4), tmp_path / "adapter", merge=False)
    assert json.loads((tmp_path / "adapter" / "processor_config.json").read_text())["tiling"]["max_tiles"] == 4
    assert main(["export", "--merge-lora", "--model", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    assert load(tmp_path / "merged")[1].max_tiles == 4


def test_qlora_without_cuda_says_so(model_config):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        lora_model(model_config, quantize="4bit")


def test_lora_config_keys_load():
    config = load_config(None, ["train.lora.enabled=true", "train.lora.r=8", "train.lora.target_modules=[q_proj,v_proj]"])
    assert config.train.lora.r == 8 and config.train.lora.target_modules == ["q_proj", "v_proj"]


def test_lora_through_the_training_loop_writes_a_merged_final_folder(backbones, synthetic, tmp_path):
    """`train.lora.enabled` end to end: the loop applies it, checkpoints hold the adapters, and `final/`
    is a plain (merged) VLM folder that loads without peft."""
    from vlm.train import train

    out = tmp_path / "run"
    config = load_config(None, [
        f"model.vision={backbones['vit']}", f"model.lm={backbones['lm']}", "model.projector.type=mlp2x_gelu",
        f"data.train_files=[{synthetic['train']}]", "train.stage=finetune", "train.max_steps=6",
        "train.batch_size=4", "train.lr=5e-3", "train.save_every=3", "train.report_to=none",
        "train.lora.enabled=true", "train.lora.r=4", f"output_dir={out}",
    ])
    summary = train(config)
    assert summary["final_loss"] < summary["first_loss"]
    loaded = VLM.from_pretrained(out / "final")
    assert not has_lora(loaded)
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()
