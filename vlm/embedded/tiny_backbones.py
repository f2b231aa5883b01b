"""Tiny, locally pre-trained vision and language backbones: the embedded default.

No weights can be downloaded, so the quickstart builds its own stand-ins for a hub ViT
(timm; plus a transformers SigLIP tower, `vlm/embedded/tiny_siglip.py`) and a hub Llama. Each is
briefly pre-trained on the synthetic shapes domain (so the frozen ViT's patch features
already carry colour/shape/size/count/position, as a real pretrained tower's would) and
saved in its library's own format, so the rest of the project loads them exactly as it
loads hub models: `timm.create_model("local-dir:...")`, `AutoModel` / `AutoImageProcessor`
and `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(...)`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import timm
import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models import save_for_hf

from .pretrain import (
    HEADS, IMAGE_SIZE, PATCH_SIZE, fit_on_scenes, head_mean, heldout_accuracy, lr_at, pixel_normalizer,
    pretraining_summary, scene_pool, tail_mean, vit_heldout_pool,
)
from .synthetic import text_corpus
from .tiny_siglip import pretrain_siglip

logger = logging.getLogger(__name__)

VIT_ARCH = "vit_tiny_patch16_224"  # registered name; model_args below override its shape
VIT_ARGS = dict(img_size=IMAGE_SIZE, patch_size=PATCH_SIZE, embed_dim=128, depth=4, num_heads=4, global_pool="token")
LM_CONFIG = dict(
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
LM_VOCAB = 1024
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>")

# Generic words so the tokenizer has merges for ordinary English, not only the shapes domain.
_WORDS = {
    "det": "the a this that every some one another each my your our their".split(),
    "adj": ("big small old new good bad long short high low red green blue bright dark quiet loud happy "
            "simple strange early late open close warm cold heavy light round flat sharp soft clean").split(),
    "noun": ("man woman child dog cat house car tree city river road book table window door water time "
             "day night year world hand eye head friend teacher student picture image question answer room "
             "garden street train ship bird horse school market letter story song game model computer").split(),
    "verb": ("sees finds takes makes gives holds reads writes paints opens closes follows watches likes "
             "needs wants moves carries describes answers counts draws shows knows builds").split(),
    "prep": "in on under over near behind beside with without from into across through after before".split(),
    "adv": "quickly slowly often never always today again here there carefully quietly".split(),
}


def english_text(n: int, seed: int) -> list[str]:
    """`n` random English-like sentences (varied case, punctuation, digits) for the tokenizer."""
    rng = random.Random(f"english:{seed}")
    out = []
    for _ in range(n):
        pick = {k: rng.choice(v) for k, v in _WORDS.items()}
        s = (f"{pick['det']} {pick['adj']} {pick['noun']} {pick['verb']} {rng.choice(_WORDS['det'])} "
             f"{rng.choice(_WORDS['noun'])} {pick['prep']} the {rng.choice(_WORDS['noun'])}")
        if rng.random() < 0.3:
            s += f" {pick['adv']}"
        if rng.random() < 0.2:
            s += f", {rng.randint(0, 1999)} times"
        s = s[0].upper() + s[1:] + rng.choice([".", ".", "!", "?", ";"])
        out.append(s)
    return out


def build_tokenizer(texts: list[str], vocab_size: int = LM_VOCAB):
    """Byte-level BPE (every byte string is encodable and round-trips) as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=LM_CONFIG["max_position_embeddings"],
    )


class _ViTPretrainer(torch.nn.Module):
    """Classifier on the class token plus a dense probe on every patch token of the
    penultimate block, the layer the VLM reads (encoders' default feature_layer=-2).
    Supervising each patch directly (scene attributes + its own pixel mask of the object)
    makes those features useful in a few hundred steps; the class-token loss alone leaves
    shape and position at chance for that long."""

    def __init__(self, vit: torch.nn.Module) -> None:
        super().__init__()
        self.vit = vit
        dim, n_classes = vit.embed_dim, vit.num_classes
        n_out = n_classes + PATCH_SIZE**2
        self.probe = torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, n_out))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vit = self.vit
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        for i, block in enumerate(vit.blocks):
            h = block(h)
            if i == len(vit.blocks) - 2:
                dense = self.probe(h[:, vit.num_prefix_tokens :])
        return vit.forward_head(vit.norm(h)), dense


def pretrain_vit(out_dir: str | Path, steps: int, seed: int = 0, batch_size: int = 32, lr: float = 3e-3) -> dict:
    """Pre-train a small timm ViT on synthetic scenes and save it for `local-dir:` loading."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    rng = random.Random(f"vit:{seed}")
    n_classes = sum(len(v) for v in HEADS.values())
    vit = timm.create_model(VIT_ARCH, pretrained=False, num_classes=n_classes, **VIT_ARGS)
    with torch.no_grad():
        # 2-D sin-cos start (as in MAE): from timm's near-zero init, position stays unlearnt for hundreds of steps.
        grid = IMAGE_SIZE // VIT_ARGS["patch_size"]
        vit.pos_embed.zero_()
        vit.pos_embed[0, vit.num_prefix_tokens :] = build_sincos2d_pos_embed([grid, grid], vit.embed_dim)
    model = _ViTPretrainer(vit)
    train_x, train_y, train_mask = scene_pool(min(max(steps, 1) * batch_size, 8192), rng)
    test_x, test_y, test_mask = vit_heldout_pool(seed)
    mean, std, prep = pixel_normalizer(train_x)

    losses = fit_on_scenes(model, prep, train_x, train_y, train_mask, steps, lr, batch_size, seed)

    accuracy = heldout_accuracy(model, prep, test_x, test_y, test_mask)

    save_for_hf(
        vit,
        str(out_dir),
        safe_serialization=True,
        model_config={
            "label_names": [f"{k}:{v}" for k, vals in HEADS.items() for v in vals],
            "pretrained_cfg": {"tag": "synthetic_shapes", "license": "apache-2.0"},
        },
        # crop_pct=1.0: eval preprocessing must never crop away a shape at the border.
        data_config={
            "input_size": (3, IMAGE_SIZE, IMAGE_SIZE),
            "mean": mean,
            "std": std,
            "crop_pct": 1.0,
            "interpolation": "bicubic",
        },
    )
    return pretraining_summary(steps, losses, accuracy, mean, std)


def _token_stream(tokenizer, lines: list[str]) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(lines, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def lm_loss(model, tokenizer, lines: list[str], block: int = 128) -> float:
    """Mean next-token loss over `lines` packed into blocks; used for held-out evaluation."""
    stream = _token_stream(tokenizer, lines)
    n = (len(stream) - 1) // block
    if n == 0:
        raise ValueError("not enough text for one block")
    x = stream[: n * block].view(n, block)
    model.eval()
    losses = [model(input_ids=x[i : i + 32], labels=x[i : i + 32]).loss.item() for i in range(0, n, 32)]
    return float(np.mean(losses))


def pretrain_lm(
    out_dir: str | Path, steps: int, seed: int = 0, batch_size: int = 8, block: int = 128, lr: float = 2e-3
) -> dict:
    """Train a byte-level BPE tokenizer and pre-train a small Llama on the synthetic text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    corpus = text_corpus(max(20000, steps * batch_size * block // 10), seed)
    tokenizer = build_tokenizer(corpus[:20000] + english_text(4000, seed), LM_VOCAB)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **LM_CONFIG,
    )
    model = LlamaForCausalLM(config)
    heldout = text_corpus(1500, seed + 10_000)
    loss_before = lm_loss(model, tokenizer, heldout, block)

    stream = _token_stream(tokenizer, corpus)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        starts = torch.randint(len(stream) - block, (batch_size,), generator=gen)
        x = torch.stack([stream[s : s + block] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    loss_after = lm_loss(model, tokenizer, heldout, block)

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {
        "steps": steps,
        "vocab_size": len(tokenizer),
        "log_vocab": math.log(len(tokenizer)),
        "first_loss": head_mean(losses),
        "final_loss": tail_mean(losses),
        "heldout_loss_before": loss_before,
        "heldout_loss": loss_after,
    }


SIGLIP_DEFAULT_STEPS = 40
"""Pre-training steps of the tiny SigLIP tower unless given (never more than `vit_steps`); keeps its build short."""


def make_tiny_backbones(
    out_dir: str | Path, vit_steps: int, lm_steps: int, seed: int = 0, siglip_steps: int | None = None
) -> dict[str, Path]:
    """Write `out_dir/vit` (timm local-dir), `out_dir/siglip` (transformers SigLIP vision tower) and
    `out_dir/lm` (transformers), plus pretraining.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"vit": out_dir / "vit", "lm": out_dir / "lm", "siglip": out_dir / "siglip"}
    if siglip_steps is None:
        siglip_steps = min(vit_steps, SIGLIP_DEFAULT_STEPS)
    report: dict[str, dict] = {}
    builders = (("vit", pretrain_vit, vit_steps), ("lm", pretrain_lm, lm_steps), ("siglip", pretrain_siglip, siglip_steps))
    for name, fn, steps in builders:
        t0 = time.perf_counter()
        report[name] = fn(paths[name], steps, seed)
        report[name]["seconds"] = round(time.perf_counter() - t0, 1)
        logger.info("%s: %s", name, report[name])
    (out_dir / "pretraining.json").write_text(json.dumps(report, indent=2))
    return paths
