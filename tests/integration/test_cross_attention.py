"""`model.fusion: cross_attention`: gated blocks start as the identity, see only the most recent
image, generate identically with and without the KV cache, round-trip, and train in align."""

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_model

from vlm.constants import WEIGHTS_NAME
from vlm.data.collator import Collator
from vlm.data.sample import Sample
from vlm.factory import processor_for, save
from vlm.fusion.decoder_layers import PreLayerWrapper
from vlm.image_positions import ImagePositions
from vlm.model import VLM

torch.set_num_threads(1)

RED, BLUE, GREEN = (200, 30, 30), (30, 30, 200), (30, 200, 30)


def build(model_config, every_n: int = 2) -> VLM:
    torch.manual_seed(0)
    config = model_config.with_fusion("cross_attention", every_n_layers=every_n)
    return VLM.from_config(config).eval()


def open_gates(model: VLM, value: float = 1.0) -> None:
    with torch.no_grad():
        for block in model.fusion.blocks.values():
            block.attn_gate.fill_(value)
            block.ffn_gate.fill_(value)


def batch_of(model: VLM, specs: list[tuple[str, list]], padding_side: str = "right", prompt: bool = False) -> dict:
    answer = [] if prompt else [{"role": "assistant", "content": "ok"}]
    samples = [
        Sample(f"s{i}", [{"role": "user", "content": text}] + answer, [Image.new("RGB", (64, 64), c) for c in colours])
        for i, (text, colours) in enumerate(specs)
    ]
    encoded = [processor_for(model)(s, for_generation=prompt) for s in samples]
    return Collator(model.tokenizer.pad_token_id, padding_side)(encoded)


def forward(model: VLM, batch: dict, **kwargs) -> torch.Tensor:
    return model(batch.input_ids, batch.attention_mask, batch.pixel_values, **kwargs)


def generate(model: VLM, batch: dict, **kwargs) -> torch.Tensor:
    embeds, features = model.embed(batch.input_ids, batch.pixel_values)
    return model.fusion.lm_generate(
        model.lm, inputs_embeds=embeds, attention_mask=batch.attention_mask, image_features=features,
        images=ImagePositions.of_batch(batch.input_ids == model.image_token_id), do_sample=False, **kwargs,
    )


MIXED = [("Look <image> then <image>, which?", [RED, BLUE]), ("Only text here, a longer prompt.", []),
         ("<image>\nColour?", [GREEN])]


def test_layers_are_wrapped_without_changing_checkpoint_keys(model_config):
    model = build(model_config, every_n=2)
    layers = model.lm.model.layers
    assert [isinstance(layer, PreLayerWrapper) for layer in layers] == [False, True, False, True]
    assert sorted(model.fusion.blocks) == ["1", "3"]
    plain = VLM.from_config(model_config)
    assert set(model.lm.state_dict()) == set(plain.lm.state_dict())


@torch.no_grad()
def test_at_init_logits_equal_the_base_lm(model_config):
    model = build(model_config, every_n=1)
    batch = batch_of(model, MIXED)
    ours = forward(model, batch).logits
    base = model.lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(ours, base, atol=1e-6, rtol=0)


@torch.no_grad()
def test_open_gates_change_only_tokens_at_or_after_an_image(model_config):
    model = build(model_config)
    open_gates(model)
    batch = batch_of(model, MIXED)
    ours = forward(model, batch).logits
    base = model.lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    changed = (ours - base).abs().amax(-1) > 1e-4  # [batch, seq]
    seen_image = (batch.input_ids == model.image_token_id).cumsum(1) > 0
    real = batch.attention_mask.bool()
    assert not changed[~seen_image].any()
    assert changed[seen_image & real].all()
    assert not changed[1].any()  # the text-only sample


@torch.no_grad()
def test_tokens_see_only_the_most_recent_image(model_config):
    # End to end, tokens after the second image still read tokens between the images through the
    # LM's self-attention, so the cross-attention's own output is compared: what the first block
    # hands its decoder layer (all inputs before it are image-free).
    model = build(model_config, every_n=2)
    open_gates(model)
    seen = []
    model.lm.model.layers[1].layer.register_forward_pre_hook(lambda module, args: seen.append(args[0][0]))
    first = batch_of(model, [MIXED[0]])
    other = batch_of(model, [("Look <image> then <image>, which?", [GREEN, BLUE])])
    markers = (first.input_ids[0] == model.image_token_id).nonzero().flatten().tolist()
    forward(model, first), forward(model, other)
    a, b = seen
    torch.testing.assert_close(a[markers[1]:], b[markers[1]:], atol=0, rtol=0)
    assert (a[markers[0]:markers[1]] - b[markers[0]:markers[1]]).abs().amax(-1).min() > 1e-4
    torch.testing.assert_close(a[:markers[0]], b[:markers[0]], atol=0, rtol=0)


@torch.no_grad()
def test_cached_generation_matches_recomputation_token_for_token(model_config):
    model = build(model_config)
    open_gates(model, 2.0)
    batch = batch_of(model, MIXED, padding_side="left", prompt=True)
    kwargs = dict(max_new_tokens=12, return_dict_in_generate=True, output_logits=True)
    cached = generate(model, batch, **kwargs)
    uncached = generate(model, batch, use_cache=False, **kwargs)
    recomputed_kv = generate(model, batch, cache_visual_kv=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.equal(cached.sequences, recomputed_kv.sequences)
    for x, y in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
    # The first step is the prompt's forward, images included, so the images did reach generation.
    torch.testing.assert_close(cached.logits[0], forward(model, batch).logits[:, -1], atol=1e-4, rtol=1e-4)
    base = model.lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, -1]
    assert (cached.logits[0][[0, 2]] - base[[0, 2]]).abs().max() > 1e-3


@torch.no_grad()
def test_text_only_generation_equals_the_base_lm(model_config):
    model = build(model_config)
    open_gates(model)
    batch = batch_of(model, [("Say something about colours.", [])], padding_side="left", prompt=True)
    ours = processor_for(model).decode(model.generate(**batch.generation_inputs(), max_new_tokens=12))
    ids = model.lm.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            max_new_tokens=12, do_sample=False)
    assert ours == model.tokenizer.batch_decode(ids[:, batch.input_ids.shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def test_save_load_round_trip_gives_identical_logits(model_config, tmp_path):
    model = build(model_config)
    open_gates(model, 0.5)
    for p in model.fusion.parameters():
        p.add_(0.01)
    batch = batch_of(model, MIXED)
    save(model, processor_for(model), tmp_path / "saved")
    loaded = build(model.config)  # what `from_pretrained` does: build, attach, load the weights
    load_model(loaded, str(tmp_path / "saved" / WEIGHTS_NAME))
    torch.testing.assert_close(forward(loaded, batch).logits, forward(model, batch).logits, atol=0, rtol=0)


@torch.no_grad()
def test_from_pretrained_round_trip(model_config, tmp_path):
    model = build(model_config)
    open_gates(model, 0.5)
    batch = batch_of(model, MIXED)
    save(model, processor_for(model), tmp_path / "saved")
    loaded = VLM.from_pretrained(tmp_path / "saved").eval()
    keys = ("input_ids", "attention_mask", "pixel_values")
    torch.testing.assert_close(loaded(**{k: getattr(batch, k) for k in keys}).logits, forward(model, batch).logits,
                               atol=0, rtol=0)


@torch.no_grad()
def test_a_folder_saved_with_the_old_flat_fusion_keys_still_loads(model_config, tmp_path):
    """Folders written before the per-strategy sections (`cross_attn_every_n_layers`, ...) are translated."""
    model = build(model_config)
    open_gates(model, 0.5)
    batch = batch_of(model, MIXED)
    save(model, processor_for(model), tmp_path / "saved")
    path = tmp_path / "saved" / "config.json"
    meta = json.loads(path.read_text())
    for section in ("projector", "resampler", "cross_attention"):
        del meta["model"][section]
    meta["model"].update(projector="mlp2x_gelu", pixel_shuffle_factor=2, cross_attn_every_n_layers=2,
                         cross_attn_heads=None, resampler_depth=0, resampler_latents=64)
    path.write_text(json.dumps(meta))
    loaded = VLM.from_pretrained(tmp_path / "saved").eval()
    assert loaded.config == model.config
    keys = ("input_ids", "attention_mask", "pixel_values")
    torch.testing.assert_close(loaded(**{k: getattr(batch, k) for k in keys}).logits, forward(model, batch).logits,
                               atol=0, rtol=0)


def test_align_step_trains_the_gated_blocks_and_not_the_lm(model_config):
    from vlm.train.freezing import apply_stage

    model = build(model_config)
    apply_stage(model, "align")
    model.train()
    batch = batch_of(model, MIXED)
    forward(model, batch, labels=batch.labels).loss.backward()
    assert all(p.grad is not None for p in model.fusion.parameters())
    assert all(float(b.attn_gate.grad.abs()) > 0 and float(b.ffn_gate.grad.abs()) > 0
               for b in model.fusion.blocks.values())
    assert all(p.grad is None for p in model.lm.parameters())
    assert all(p.grad is None for p in model.vision.parameters())
    # The <image> marker's embedding trains with the fusion, starting from the LM's (frozen) row.
    marker = model.fusion.image_embedding
    assert marker.requires_grad and float(marker.grad.abs().sum()) > 0
    torch.testing.assert_close(marker.detach(), model.lm.get_input_embeddings().weight[model.image_token_id])


def test_gate_lr_scale_steps_the_gates_faster_than_the_rest(model_config):
    from vlm.config import Config, TrainConfig
    from vlm.train.freezing import apply_stage
    from vlm.train.optim import build_optimizer

    torch.manual_seed(0)
    model = VLM.from_config(model_config.with_fusion("cross_attention", every_n_layers=2, gate_lr_scale=10.0))
    apply_stage(model, "align")
    optimizer = build_optimizer(model, Config(train=TrainConfig(stage="align", fusion_lr=1e-3)))
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    gates = {id(g) for b in model.fusion.blocks.values() for g in (b.attn_gate, b.ffn_gate)}
    assert gates and all(lr_of[i] == pytest.approx(1e-2) for i in gates)
    assert {lr_of[id(p)] for p in model.fusion.parameters() if id(p) not in gates} == {1e-3}
    # One Adam step moves a parameter with a gradient by about its learning rate: the gates by 1e-2, from 0, the
    # <image> marker's row by 1e-3 (the blocks themselves get no gradient while their gates are exactly 0).
    batch = batch_of(model.train(), MIXED)
    before = {n: p.detach().clone() for n, p in model.fusion.named_parameters()}
    forward(model, batch, labels=batch.labels).loss.backward()
    optimizer.step()
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.fusion.named_parameters()}
    assert all(v == pytest.approx(1e-2, rel=1e-3) for n, v in moved.items() if n.endswith("_gate")), moved
    assert moved["image_embedding"] == pytest.approx(1e-3, rel=1e-2)


@torch.no_grad()
def test_perceiver_resampler_gives_a_fixed_number_of_visual_tokens(model_config):
    torch.manual_seed(0)
    config = model_config.with_fusion("cross_attention", every_n_layers=2, resampler_depth=1, resampler_latents=5)
    model = VLM.from_config(config).eval()
    features = torch.randn(3, 64, model.fusion.vision_dim)
    assert model.fusion.embed_images(features).shape == (3, 5, model.fusion.lm_dim)
    open_gates(model)
    batch = batch_of(model, MIXED, padding_side="left", prompt=True)
    cached = generate(model, batch, max_new_tokens=6)
    assert torch.equal(cached, generate(model, batch, max_new_tokens=6, use_cache=False))


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
@torch.no_grad()
def test_other_decoders_get_the_same_behaviour(arch):
    import transformers

    from vlm.fusion import LMShape, VisionShape
    from vlm.fusion.cross_attention import CrossAttentionFusion, CrossAttentionOptions

    config = {
        "gpt2": transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                        bos_token_id=0, eos_token_id=0),
        "qwen2": transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=100),
    }[arch]
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(config).eval()
    keys = set(lm.state_dict())
    fusion = CrossAttentionFusion(CrossAttentionOptions(every_n_layers=1), VisionShape(32, (2, 2), (8, 8)),
                                  LMShape.of(lm.config))
    fusion.attach(lm, image_token_id=1)
    assert set(lm.state_dict()) == keys
    ids = torch.randint(5, 100, (2, 10))
    ids[0, 3] = ids[1, 6] = 1
    inputs = dict(inputs_embeds=lm.get_input_embeddings()(ids), attention_mask=torch.ones_like(ids),
                  image_features=torch.randn(2, 4, 32), images=ImagePositions.of_batch(ids == 1))
    base = lm(inputs_embeds=inputs["inputs_embeds"]).logits
    torch.testing.assert_close(fusion.lm_forward(lm, **inputs).logits, base, atol=1e-6, rtol=0)
    open_gates(SimpleNamespace(fusion=fusion))
    changed = (fusion.lm_forward(lm, **inputs).logits - base).abs().amax(-1) > 1e-5
    assert changed.tolist() == [[i >= 3 for i in range(10)], [i >= 6 for i in range(10)]]
    cached = fusion.lm_generate(lm, **inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(cached, fusion.lm_generate(lm, **inputs, max_new_tokens=6, do_sample=False, use_cache=False))


def test_short_training_run_lowers_the_loss_and_opens_the_gates(backbones, synthetic, tmp_path):
    import json

    from vlm.config import load_config
    from vlm.train import train

    config = load_config(None, [
        f"model.vision={backbones['vit']}", f"model.lm={backbones['lm']}", "model.fusion=cross_attention",
        "model.cross_attention.every_n_layers=2", f"data.train_files=[{synthetic['train']}]", "train.stage=align",
        "train.max_steps=30", "train.batch_size=8", "train.lr=2e-3", "train.report_to=none",
        "train.gradient_checkpointing=true", f"output_dir={tmp_path}",
    ])
    summary = train(config)
    assert summary["final_loss"] < 0.8 * summary["first_loss"], summary
    trained = VLM.from_pretrained(tmp_path / "final")
    gates = [g.item() for b in trained.fusion.blocks.values() for g in (b.attn_gate, b.ffn_gate)]
    assert gates and all(abs(g) > 1e-4 for g in gates), gates
    assert json.loads((tmp_path / "final" / "config.json").read_text())["model"]["fusion"] == "cross_attention"


def test_the_decode_position_comes_from_the_lm_call_or_fails_loudly():
    """Decoder layers' cache keyword has been renamed upstream; the position is read from the LM's
    public call (2-D mask minus new tokens, or any cache object), and an unknown cache fails."""
    from transformers import DynamicCache

    from vlm.fusion.decoder_layers import past_length_of_call

    step = torch.zeros(2, 1, 8)
    assert past_length_of_call({"inputs_embeds": step, "attention_mask": torch.ones(2, 13)}) == 12
    assert past_length_of_call({"input_ids": torch.zeros(2, 5, dtype=torch.long)}) == 0
    cache = DynamicCache()
    cache.update(torch.zeros(2, 1, 7, 4), torch.zeros(2, 1, 7, 4), 0)
    assert past_length_of_call({"inputs_embeds": step, "renamed_cache_keyword": cache}) == 7
    with pytest.raises(RuntimeError, match="Cannot tell how many positions"):
        past_length_of_call({"inputs_embeds": step, "past_state": ("opaque",)})
