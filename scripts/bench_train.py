"""Training-step time of our VLM against transformers' own `LlavaForConditionalGeneration`, in one run.

Both models come from the same backbones with the same weights: our VLM is built from a
transformers vision tower (SigLIP, or CLIP with --tower clip) and a Llama-style LM with the
`mlp2x_gelu` projector, then exported with `export_llava_hf` and loaded back as a Llava. Before
timing, both train on the same batch from the same state and their losses must agree (fp32:
<= 1e-4; bf16: <= 2e-2); every timed step's loss is compared too. Then, per stage (`align`: the
projector trains; `finetune`: projector + LM), after warm-up, the two models take steps in turn on
that batch (AdamW, same precision) and the median step time of each is reported with tokens/s,
images/s and the ratio ours / Llava (target: <= 0.9 on CPU). Alternating step by step keeps machine
noise (the CPU may be shared) from favouring either model. The batch is moved to the device once,
outside the timed region, for both.

On CUDA it also prints model FLOPs utilisation, MFU = model FLOPs per step / median step time /
the GPU's dense bf16 peak. Model FLOPs per step count the work the step needs (see `step_flops`):

  forward FLOPs, 2 per multiply-add:
    vision  per image: patch embedding + the encoder layers up to `vision_feature_layer` (the layers
            after it, the post-norm and any pooling head do not affect the output and are not counted);
            per layer 2*P*(4*d^2 + 2*d*ffn) matmuls + 2*P^2*d attention (QK^T and AV, P patches).
    projector per image token: 2*(d_vision*d_lm + d_lm*d_lm).
    LM      per token: 2*(q, k, v, o and the gated MLP's 3 matrices) + attention 2*s*d_q per token
            (causal: each token attends to s/2 keys on average, QK^T and AV); the output head
            2*d_lm*vocab only at supervised positions (the logits the loss needs).
  training multipliers (the "6N + 2N" rule made exact per stage):
    vision  x1 (frozen: forward only, no backward).
    projector x3 (forward + activation grads + weight grads = the 6 FLOPs per parameter per token).
    LM, finetune: x3 on matmuls (6 per parameter per token), x3 on attention (its backward is 2x).
    LM, align: the LM is frozen but the projector's gradient flows back through it, so its backward
            computes activation gradients only: x2 on matmuls (4 per parameter per token), x3 on
            attention (it has no weights; its backward is 2x forward either way).

Usage:
    python scripts/bench_train.py                                 # tiny sizes, CPU, both stages
    python scripts/bench_train.py --sizes medium --batch-size 8 --steps 20
    python scripts/bench_train.py --lm artifacts/real/backbones/lm --stage finetune   # the real SmolLM2 LM
    python scripts/bench_train.py --device cuda --dtype bf16 --sizes siglip-b16-360m --stage finetune
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import (
    CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM,
    LlavaForConditionalGeneration, SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel,
)
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm.config import ModelConfig  # noqa: E402
from vlm.data.collator import Collator  # noqa: E402
from vlm.data.sample import Sample  # noqa: E402
from vlm.factory import processor_for  # noqa: E402
from vlm.hub.export import export_llava_hf  # noqa: E402
from vlm.loss import IGNORE_INDEX, count_supervised  # noqa: E402
from vlm.model import VLM  # noqa: E402
from vlm.embedded.tiny_backbones import build_tokenizer, english_text  # noqa: E402
from vlm.train.freezing import apply_stage  # noqa: E402

hf_logging.disable_progress_bar()

# vision: width, layers, heads, MLP, image px, patch; lm: width, layers, heads, kv heads, MLP, vocab;
# text: words in the question / answer of each sample.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(  # the quickstart's shapes
        vision=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                    image_size=64, patch_size=8),
        lm=dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=512, vocab_size=1024),
        question_words=12, answer_words=8, batch_size=16,
    ),
    "medium": dict(  # big enough on CPU for matmuls, not Python, to dominate the step
        vision=dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536,
                    image_size=128, patch_size=16),
        lm=dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                intermediate_size=1536, vocab_size=16384),
        question_words=24, answer_words=24, batch_size=8,
    ),
    "siglip-b16-360m": dict(  # SigLIP-B/16 tower + SmolLM2-360M-shaped Llama, random weights
        vision=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    image_size=224, patch_size=16),
        lm=dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                intermediate_size=2560, vocab_size=49152, rope_theta=100000.0),
        question_words=40, answer_words=60, batch_size=16,
    ),
}

# Dense bf16 peak TFLOP/s (no sparsity), matched against torch.cuda.get_device_name in order.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def build_backbones(root: Path, size: dict[str, Any], tower: str, image_size: int | None) -> tuple[Path, Path]:
    """Write a random-weight transformers vision tower and Llama LM (+ a small BPE tokenizer) to `root`."""
    vision_args = dict(size["vision"])
    if image_size:
        vision_args["image_size"] = image_size
    px = vision_args["image_size"]
    torch.manual_seed(0)
    if tower == "siglip":
        SiglipVisionModel(SiglipVisionConfig(**vision_args)).save_pretrained(root / "vision")
        SiglipImageProcessor(size={"height": px, "width": px}).save_pretrained(root / "vision")
    else:
        CLIPVisionModel(CLIPVisionConfig(**vision_args)).save_pretrained(root / "vision")
        CLIPImageProcessor(size={"shortest_edge": px}, crop_size={"height": px, "width": px}).save_pretrained(
            root / "vision"
        )
    lm_args = dict(size["lm"])
    tokenizer = build_tokenizer(english_text(3000, 0), min(lm_args["vocab_size"], 2048))
    config = LlamaConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_position_embeddings=4096, tie_word_embeddings=True, **lm_args,
    )
    LlamaForCausalLM(config).save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    return root / "vision", root / "lm"


def make_batch(model: VLM, batch_size: int, question_words: int, answer_words: int, px: int) -> dict[str, Any]:
    """One right-padded training batch (one image per sample, lengths varying +-25%) from our processor;
    Llava gets exactly the same tensors (same `<image>` id, same number of image slots)."""
    rng = random.Random(0)
    words = " ".join(english_text(200, 1)).split()
    processor, items = processor_for(model), []
    for i in range(batch_size):
        q = " ".join(rng.choices(words, k=max(1, round(question_words * rng.uniform(0.75, 1.25)))))
        a = " ".join(rng.choices(words, k=max(1, round(answer_words * rng.uniform(0.75, 1.25)))))
        image = Image.new("RGB", (px, px), tuple(rng.randrange(256) for _ in range(3)))
        sample = Sample(f"s{i}", [{"role": "user", "content": f"<image>\n{q}"}, {"role": "assistant", "content": a}],
                        [image])
        items.append(processor(sample))
    batch = Collator(model.tokenizer.pad_token_id, "right")(items)
    return {k: getattr(batch, k) for k in ("input_ids", "attention_mask", "pixel_values", "labels")}


def set_llava_stage(llava: LlavaForConditionalGeneration, stage: str) -> None:
    """The same split as `vlm.train.freezing.apply_stage`: tower frozen (and in eval mode), projector
    trains, the LM (decoder + head) trains in `finetune` only."""
    llava.requires_grad_(stage == "finetune")
    llava.model.vision_tower.requires_grad_(False)
    llava.model.multi_modal_projector.requires_grad_(True)
    llava.train()
    llava.model.vision_tower.eval()


class Runner:
    """One model, its optimiser and its step timings."""

    def __init__(self, name: str, model: torch.nn.Module, batch: dict[str, Any], device: torch.device,
                 dtype: torch.dtype) -> None:
        self.name, self.model, self.batch, self.device, self.dtype = name, model, batch, device, dtype
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.times: list[float] = []
        self.losses: list[float] = []

    def step(self, timed: bool) -> float:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        started = time.perf_counter()
        autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32
                    else contextlib.nullcontext())
        with autocast:
            loss = self.model(**self.batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = loss.item()  # a host sync, as a logging loop has
        sync()
        if timed:
            self.times.append(time.perf_counter() - started)
        self.losses.append(value)
        return value


def step_flops(model: VLM, batch: dict[str, Any], stage: str) -> float:
    """Model FLOPs of one training step as stated in the module docstring."""
    vcfg, tcfg = model.vision.model.config, model.lm.config
    n_images, batch_size, seq = batch["pixel_values"].shape[0], *batch["input_ids"].shape
    tokens = int(batch["attention_mask"].sum())
    supervised = count_supervised(batch["labels"])
    patches_total = (vcfg.image_size // vcfg.patch_size) ** 2 + (1 if "clip" in vcfg.model_type else 0)
    layers_used = model.vision.feature_layer % (vcfg.num_hidden_layers + 1)
    d, ffn = vcfg.hidden_size, vcfg.intermediate_size
    vision = n_images * (2 * patches_total * 3 * vcfg.patch_size ** 2 * d
                         + layers_used * (2 * patches_total * (4 * d * d + 2 * d * ffn) + 2 * patches_total ** 2 * d))
    image_tokens = n_images * model.fusion.tokens_per_image
    projector = image_tokens * 2 * (d * tcfg.hidden_size + tcfg.hidden_size ** 2)
    h, head_dim = tcfg.hidden_size, getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads
    dq, dkv = tcfg.num_attention_heads * head_dim, tcfg.num_key_value_heads * head_dim
    per_layer = 2 * (h * dq + 2 * h * dkv + dq * h + 3 * h * tcfg.intermediate_size)
    lm_matmul = tokens * tcfg.num_hidden_layers * per_layer + supervised * 2 * h * tcfg.vocab_size
    lm_attention = tcfg.num_hidden_layers * batch_size * 2 * seq * seq * dq / 2 * 2  # QK^T + AV, causal half
    lm_factor = 3 if stage == "finetune" else 2
    return vision + 3 * projector + lm_factor * lm_matmul + 3 * lm_attention


def peak_tflops(override: float | None) -> tuple[float | None, str]:
    name = torch.cuda.get_device_name()
    if override:
        return override, f"{name} (--peak-tflops)"
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value, name
    return None, name


def run_stage(stage: str, ours0: VLM, llava0: LlavaForConditionalGeneration, batch: dict[str, Any],
              args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    ours = copy.deepcopy(ours0)
    apply_stage(ours, stage)
    ours.train()
    llava = copy.deepcopy(llava0)
    set_llava_stage(llava, stage)
    runners = [Runner("ours", ours.to(device), batch, device, dtype),
               Runner("llava-hf", llava.to(device), batch, device, dtype)]
    if runners[0].trainable != runners[1].trainable:
        raise RuntimeError(f"{stage}: trainable parameters differ ({runners[0].trainable} vs {runners[1].trainable}).")
    for _ in range(args.warmup):  # the first warm-up step is also the loss-match check (same state, same batch)
        for runner in runners:
            runner.step(timed=False)
    for i in range(args.steps):  # alternate step by step; swap who goes first each round
        for runner in (runners if i % 2 == 0 else runners[::-1]):
            runner.step(timed=True)
    diff = max(abs(a - b) for a, b in zip(runners[0].losses, runners[1].losses))
    return {"stage": stage, "runners": runners, "loss_diff": diff, "first_loss": runners[0].losses[0],
            "flops": step_flops(ours, batch, stage)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--sizes", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--tower", choices=["siglip", "clip"], default="siglip")
    parser.add_argument("--image-size", type=int, default=None, help="override the tower's image size (e.g. 384)")
    parser.add_argument("--stage", choices=["align", "finetune", "both"], default="both")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model and stage")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model and stage (>= 1)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU dense bf16 peak, if not detected")
    parser.add_argument("--lm", default=None, help="a real LM folder (e.g. artifacts/real/backbones/lm) in place of "
                        "the random Llama of --sizes; the tower stays --sizes' (Llava takes transformers towers)")
    args = parser.parse_args(argv)
    args.warmup = max(1, args.warmup)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible.")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    size = SIZES[args.sizes]
    batch_size = args.batch_size or size["batch_size"]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        vision_dir, lm_dir = build_backbones(root, size, args.tower, args.image_size)
        lm_dir = Path(args.lm) if args.lm else lm_dir
        torch.manual_seed(0)
        ours = VLM.from_config(ModelConfig(vision=f"hf:{vision_dir}", lm=str(lm_dir)).with_fusion("projector", type="mlp2x_gelu"))
        export_llava_hf(ours, processor_for(ours), root / "llava")
        llava = LlavaForConditionalGeneration.from_pretrained(root / "llava", dtype=torch.float32)
    px = ours.vision.model.config.image_size
    batch = make_batch(ours, batch_size, size["question_words"], size["answer_words"], px)
    tokens = int(batch["attention_mask"].sum())
    images = batch["pixel_values"].shape[0]
    supervised = int((batch["labels"] != IGNORE_INDEX).sum())
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    print(f"sizes={args.sizes} tower={args.tower} lm={args.lm or args.sizes} {px}px device={args.device} dtype={args.dtype} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"batch: {batch_size} samples x {batch['input_ids'].shape[1]} positions ({images} images x "
          f"{ours.fusion.tokens_per_image} image tokens, {tokens} real tokens, {supervised} supervised)")
    print(f"attention: ours LM={ours.lm.config._attn_implementation} "
          f"tower={ours.vision.model.config._attn_implementation}; "
          f"llava LM={llava.config.text_config._attn_implementation} "
          f"tower={llava.config.vision_config._attn_implementation}")
    print(f"{args.warmup} warm-up + {args.steps} timed steps per model and stage, alternating; medians")
    stages = ["align", "finetune"] if args.stage == "both" else [args.stage]
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    peak, gpu = peak_tflops(args.peak_tflops) if device.type == "cuda" else (None, "")
    header = f"{'stage':<9} {'model':<9} {'trainable':>12} {'ms/step':>9} {'tokens/s':>10} {'images/s':>9}"
    header += f" {'MFU':>6}" if device.type == "cuda" else ""
    print(header)
    ok = True
    results = [run_stage(stage, ours, llava, batch, args, device, dtype) for stage in stages]
    for result in results:
        medians = {}
        for runner in result["runners"]:
            median = statistics.median(runner.times)
            medians[runner.name] = median
            line = (f"{result['stage']:<9} {runner.name:<9} {runner.trainable:>12,} {median * 1000:>9.1f} "
                    f"{tokens / median:>10.0f} {images / median:>9.1f}")
            if device.type == "cuda":
                line += f" {result['flops'] / median / (peak * 1e12):>6.1%}" if peak else f" {'n/a':>6}"
            print(line)
        ratio = medians["ours"] / medians["llava-hf"]
        passed = result["loss_diff"] <= tolerance
        ok &= passed
        print(f"{result['stage']:<9} ratio ours/llava-hf step time: {ratio:.3f}  (target <= 0.9: "
              f"{'met' if ratio <= 0.9 else 'missed'})")
        verdict = "PASSED" if passed else "FAILED"
        print(f"{result['stage']:<9} loss match: first loss {result['first_loss']:.5f}, max |ours - llava| "
              f"over all steps {result['loss_diff']:.2e} (tolerance {tolerance:.0e}): {verdict}")
    if device.type == "cuda":
        if peak:
            print(f"MFU against {gpu}'s dense bf16 peak of {peak:.0f} TFLOP/s; model FLOPs per step: "
                  + ", ".join(f"{r['stage']} {r['flops'] / 1e12:.3f} TFLOP" for r in results))
        else:
            print(f"MFU: unknown peak for '{gpu}'; pass --peak-tflops.")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
