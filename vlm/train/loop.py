"""The training loop: accelerate for devices, precision, accumulation and trackers; transformers' scheduler."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..config import Config, config_to_dict
from ..data.collator import Collator
from ..data.dataset import ConversationDataset
from ..data.feature_cache import FeatureCache, encoder_fingerprint
from ..data.formats import read_samples
from ..model import VLM
from .freezing import apply_stage
from .optim import build_optimizer

logger = logging.getLogger(__name__)


def mixed_precision(setting: str) -> str:
    """`auto`: bf16 on devices that run it natively, fp32 elsewhere (CPU)."""
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_loader(
    dataset: ConversationDataset, processor_pad: int, batch_size: int, shuffle: bool, config: Config
) -> DataLoader:
    generator = torch.Generator().manual_seed(config.train.seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=Collator(processor_pad, "right"),
        num_workers=config.data.num_workers, generator=generator, pin_memory=torch.cuda.is_available(),
    )


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    keys = ("input_ids", "attention_mask", "pixel_values", "image_features", "labels")
    return {key: batch[key] for key in keys if batch.get(key) is not None}


def build_feature_cache(model: VLM, config: Config, accelerator: Accelerator) -> FeatureCache:
    """Encode every training / eval image once (each rank a share), before the first step."""
    if not model.vision.frozen:
        raise ValueError("data.cache_features needs a frozen vision encoder; this stage trains it.")
    vision = model.vision.to(accelerator.device)
    cache = FeatureCache(
        config.data.cache_dir or Path(config.output_dir) / "feature_cache",
        encoder_fingerprint(vision), (vision.num_patches, vision.hidden_size),
    )
    samples = []
    for file in [*config.data.train_files, *config.data.eval_files]:
        samples += read_samples(file, config.data.image_root)[0]
    started = time.perf_counter()
    encoded = cache.fill(samples, model.processor, vision, config.train.batch_size,
                         accelerator.process_index, accelerator.num_processes)
    accelerator.wait_for_everyone()
    logger.info("Feature cache %s: %d image(s) encoded in %.1fs.", cache.root, encoded, time.perf_counter() - started)
    return cache


@torch.no_grad()
def evaluate_loss(model: VLM, loader: DataLoader, accelerator: Accelerator) -> float:
    """Mean loss per supervised token over the whole eval set."""
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    for batch in loader:
        if "input_ids" not in batch:
            continue
        out = model(**model_inputs(batch))
        tokens = (batch["labels"][:, 1:] != -100).sum()
        total += out.loss.float() * tokens
        count += tokens
    model.train()
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    return float(total / count.clamp(min=1))


def train(config: Config) -> dict[str, Any]:
    """Train as configured; write `output_dir/final/` and return a summary of the run."""
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        mixed_precision=mixed_precision(config.train.mixed_precision),
        gradient_accumulation_steps=config.train.grad_accum,
        log_with=None if config.train.report_to == "none" else config.train.report_to,
        project_dir=str(output_dir),
    )
    set_seed(config.train.seed)
    model = VLM.from_config(config.model)
    apply_stage(model, config.train.stage)
    if config.train.gradient_checkpointing:
        model.lm.activation_checkpointing_enable({"use_reentrant": False})
    model.processor.max_length = config.data.max_length

    cache = build_feature_cache(model, config, accelerator) if config.data.cache_features else None
    train_set = ConversationDataset.from_files(
        config.data.train_files, model.processor, config.data.image_root, config.data.strict, feature_cache=cache
    )
    if len(train_set) == 0:
        raise ValueError(f"No usable training samples in {config.data.train_files} ({dict(train_set.problems)}).")
    pad = model.tokenizer.pad_token_id
    train_loader = make_loader(train_set, pad, config.train.batch_size, True, config)
    eval_loader = None
    if config.data.eval_files:
        eval_set = ConversationDataset.from_files(
            config.data.eval_files, model.processor, config.data.image_root, feature_cache=cache
        )
        eval_loader = make_loader(eval_set, pad, config.train.eval_batch_size or config.train.batch_size, False, config)

    optimizer = build_optimizer(model, config)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.train.warmup_steps, config.train.max_steps)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    accelerator.init_trackers("vlm", config=_flat(config_to_dict(config)))

    trainable = [p for p in model.parameters() if p.requires_grad]
    skipped = dict(train_set.problems)
    history: list[dict[str, float]] = []
    step, tokens, window_loss, window_n = 0, 0, 0.0, 0
    started = time.perf_counter()
    progress = tqdm(total=config.train.max_steps, disable=not accelerator.is_main_process, desc="train")
    model.train()
    while step < config.train.max_steps:
        for batch in train_loader:
            for item in batch["skipped"]:
                skipped[item["category"]] = skipped.get(item["category"], 0) + 1
                logger.warning("Skipping sample '%s': %s", item["skipped"], item["detail"])
            if "input_ids" not in batch:
                continue
            with accelerator.accumulate(model):
                out = model(**model_inputs(batch))
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and config.train.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, config.train.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            tokens += int(batch["attention_mask"].sum())
            window_loss += float(out.loss.detach())
            window_n += 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            loss = window_loss / window_n
            window_loss, window_n = 0.0, 0
            lr = scheduler.get_last_lr()[0]
            rate = tokens * accelerator.num_processes / (time.perf_counter() - started)
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}")
            history.append({"step": step, "loss": loss, "lr": lr})
            if step % config.train.log_every == 0 or step == 1:
                accelerator.log({"train/loss": loss, "train/lr": lr, "train/tokens_per_s": rate}, step=step)
            if eval_loader is not None and config.train.eval_every and step % config.train.eval_every == 0:
                eval_loss = evaluate_loss(model, eval_loader, accelerator)
                accelerator.log({"eval/loss": eval_loss}, step=step)
                progress.write(f"step {step}: eval loss {eval_loss:.4f}")
            if step >= config.train.max_steps:
                break
    progress.close()

    summary: dict[str, Any] = {
        "steps": step,
        "train_seconds": time.perf_counter() - started,
        "first_loss": history[0]["loss"],
        "final_loss": _tail_mean([h["loss"] for h in history]),
        "skipped_samples": skipped,
    }
    if eval_loader is not None:
        summary["eval_loss"] = evaluate_loss(model, eval_loader, accelerator)
        accelerator.log({"eval/loss": summary["eval_loss"]}, step=step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(output_dir / "final")
        (output_dir / "train_summary.json").write_text(json.dumps({**summary, "history": history}, indent=2))
        print(json.dumps(summary), flush=True)
    accelerator.end_training()
    return summary


def _tail_mean(values: list[float], fraction: float = 0.1) -> float:
    tail = values[-max(1, math.ceil(len(values) * fraction)) :]
    return sum(tail) / len(tail)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Trackers such as TensorBoard's hparams take flat scalar values only."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat
