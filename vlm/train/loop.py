"""The training loop: one code path for one process, DDP, FSDP2 and DeepSpeed ZeRO-2/3 (see `sharding/`).

Per optimizer step: read `grad_accum` micro-batches, count the supervised tokens of the whole global
batch, and make each rank's loss its token-loss sum over that global count, so the gradient (and the
logged loss) equals a single process's on the same global batch whatever the world size, padding or
accumulation. A non-finite loss skips the step; SIGTERM / Ctrl-C saves a checkpoint and returns.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from torch.utils.data import DataLoader, Sampler
from transformers import get_cosine_schedule_with_warmup, set_seed

from ..config import Config, config_to_dict
from ..data.collator import Collator
from ..data.sample import DataError
from ..data.dataset import ConversationDataset
from ..data.feature_cache import FeatureCache, encoder_fingerprint
from ..data.formats import read_samples
from ..data.sampler import LengthGroupedSampler, estimate_lengths
from ..factory import build
from ..hub.publish import TrainingPublisher
from ..image_slots import with_placeholder
from ..loss import IGNORE_INDEX, count_supervised
from ..model import VLM
from ..processor import VLMProcessor
from .checkpoint import list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from .distributed import DistEnv, all_reduce_sum, barrier, init_distributed, teardown
from .freezing import apply_stage
from .lora import save_final
from .optim import build_optimizer
from ..progress import Progress, progress_bar
from .sampler import ResumableSampler
from .sharding import Strategy, build_strategy
from .signals import StopRequest
from .speed import apply_gradient_checkpointing, maybe_compile
from .trackers import Trackers

logger = logging.getLogger(__name__)


class TrainingAborted(RuntimeError):
    """Too many consecutive bad (non-finite) steps; a checkpoint of the last good state was saved."""


def make_loader(
    dataset: ConversationDataset, processor_pad: int, batch_size: int, shuffle: bool, config: Config,
    sampler: Sampler | None = None,
) -> DataLoader:
    generator = torch.Generator().manual_seed(config.train.seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else None, sampler=sampler,
        collate_fn=Collator(processor_pad, "right"), num_workers=config.data.num_workers, generator=generator,
        pin_memory=torch.cuda.is_available(),
    )


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    keys = ("input_ids", "attention_mask", "pixel_values", "image_features", "labels")
    return {key: batch[key] for key in keys if batch.get(key) is not None}


def build_model(config: Config) -> tuple[VLM, VLMProcessor]:
    """The VLM with its trainable parts decided (stage, freezing), and its processor with the data settings;
    the same call at start and at export."""
    model, processor = build(config.model, config.data)
    apply_stage(model, config.train)  # stage, train.freeze, and LoRA adapters when train.lora.enabled
    return model, processor


def build_feature_cache(model: VLM, processor: VLMProcessor, config: Config, env: DistEnv) -> FeatureCache:
    """Encode every training / eval image once (each rank a share), before the first step."""
    if not model.vision.frozen:
        raise ValueError("data.cache_features needs a frozen vision encoder; this stage trains it.")
    if not model.fusion.reads_encoder_features:
        raise ValueError(f"model.fusion='{model.config.fusion}' reads raw pixels, not the tower's features; "
                         "set data.cache_features=false.")
    vision = model.vision.to(env.device)
    cache = FeatureCache(
        config.data.cache_dir or Path(config.output_dir) / "feature_cache",
        encoder_fingerprint(vision), (vision.num_patches, vision.hidden_size),
    )
    samples = []
    for file in [*config.data.train_files, *config.data.eval_files]:
        samples += read_samples(file, config.data.image_root, caption_prompt=config.data.caption_prompt,
                                vqa_prompt=config.data.vqa_prompt)[0]
    started = time.perf_counter()
    encoded = cache.fill(samples, processor, vision, config.train.batch_size, env.rank, env.world_size)
    barrier(env)
    logger.info("Feature cache %s: %d image(s) encoded in %.1fs.", cache.root, encoded, time.perf_counter() - started)
    return cache


def supervised_tokens(batch: dict[str, Any]) -> int:
    """Tokens the loss reads (vlm/loss.py); 0 for a batch whose samples all failed to load."""
    return count_supervised(batch["labels"]) if "labels" in batch else 0


def to_device(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in inputs.items()}


@torch.no_grad()
def evaluate_loss(strategy: Strategy, loader: DataLoader, config: Config, env: DistEnv) -> float:
    """Mean loss per supervised token over the whole eval set (all ranks)."""
    module, model = strategy.model, strategy.unwrapped()
    module.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for batch in loader:
        if "input_ids" not in batch:
            continue
        tokens = supervised_tokens(batch)
        inputs = to_device(with_placeholder(model_inputs(batch), model.vision, config.data.cache_features),
                           env.device)
        with strategy.autocast():
            out = module(**inputs, num_items_in_batch=torch.tensor(max(tokens, 1), device=env.device))
        total += torch.tensor([float(out.loss) * max(tokens, 1), tokens], dtype=torch.float64)
    module.train()
    total = all_reduce_sum(total, env)
    return float(total[0] / total[1].clamp(min=1))


def train(config: Config) -> dict[str, Any]:
    """Train as configured; write `output_dir/final/` and return a summary of the run."""
    env = init_distributed()
    try:
        return _train(config, env)
    finally:
        teardown(env)


def _train(config: Config, env: DistEnv) -> dict[str, Any]:
    output_dir = Path(config.output_dir)
    set_seed(config.train.seed)
    strategy = build_strategy(config, env)
    model, processor = build_model(config)
    if config.train.gradient_checkpointing:
        apply_gradient_checkpointing(model, config.train.gradient_checkpointing_components)
    maybe_compile(model, config.train.compile)

    cache = build_feature_cache(model, processor, config, env) if config.data.cache_features else None
    train_set = ConversationDataset.from_files(
        config.data.train_files, processor, config.data.image_root, config.data.strict,
        feature_cache=cache, image_dropout=config.train.image_dropout, seed=config.train.seed, data=config.data,
    )
    if len(train_set) == 0:
        raise DataError(f"No usable training samples in {config.data.train_files} ({dict(train_set.problems)}); "
                        "run `vlm data check` on them.")
    pad = model.tokenizer.pad_token_id
    if config.data.group_by_length:
        lengths = estimate_lengths(train_set.samples, processor)
        sampler = LengthGroupedSampler(lengths, config.train.batch_size, env.world_size, env.rank,
                                       seed=config.train.seed)
    else:
        sampler = ResumableSampler(train_set, env.world_size, env.rank, shuffle=True, seed=config.train.seed)
    train_loader = make_loader(train_set, pad, config.train.batch_size, False, config, sampler)
    eval_loader = None
    if config.data.eval_files:
        eval_set = ConversationDataset.from_files(
            config.data.eval_files, processor, config.data.image_root, feature_cache=cache, data=config.data,
        )
        eval_sampler = ResumableSampler(eval_set, env.world_size, env.rank, shuffle=False, seed=0)
        eval_loader = make_loader(eval_set, pad, config.train.eval_batch_size or config.train.batch_size, False,
                                  config, eval_sampler)

    module = strategy.setup(model, lambda m: build_optimizer(m, config))
    scheduler = get_cosine_schedule_with_warmup(strategy.optimizer, config.train.warmup_steps, config.train.max_steps)
    state: dict[str, Any] = {
        "step": 0, "epoch": 0, "batches_in_epoch": 0, "history": [], "bad_steps": [],
        "skipped": dict(train_set.problems),
    }
    resume = resolve_resume(config.train.resume_from, output_dir)
    if resume is not None:
        state = load_checkpoint(strategy, resume, env)
        scheduler.load_state_dict(state.pop("scheduler"))
        logger.info("Resumed from %s at step %d.", resume, state["step"])
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    trackers = Trackers(config, output_dir, enabled=env.is_main)

    publisher = TrainingPublisher(config, output_dir) if env.is_main else None
    try:
        def checkpoint() -> Path:
            path = save_checkpoint(strategy, {**state, "scheduler": scheduler.state_dict()}, config, env, output_dir,
                                   config.train.save_total_limit)
            if publisher is not None and strategy.replicated:  # hub.strategy=every_save (sharded runs push at the end)
                publisher.on_save(strategy.unwrapped(), state["step"])
            return path

        per_step = config.train.grad_accum
        consecutive_bad, stopped, started = 0, False, time.perf_counter()
        tokens_seen, last_good = 0, [_first_readable_batch(train_set, pad)]
        progress = progress_bar(total=config.train.max_steps, initial=state["step"], disable=not env.is_main,
                                desc="train", every=config.train.log_every, unit="step")
        module.train()
        with StopRequest() as stop:
            steps = _micro_batches(train_loader, sampler, train_set, state, per_step, config.train.batch_size)
            for micro in steps if state["step"] < config.train.max_steps else ():
                result = _step(strategy, model, micro, config, env, state, stop, last_good)
                tokens_seen += result["tokens"]
                stopped = result["stop"]
                if result["bad"]:
                    consecutive_bad += 1
                    state["bad_steps"].append({"after_step": state["step"], "samples": result["ids"]})
                    logger.warning("Non-finite loss after step %d (samples %s): step skipped, no update.",
                                   state["step"], result["ids"])
                    if consecutive_bad >= config.train.max_bad_steps:
                        path = checkpoint()
                        raise TrainingAborted(
                            f"{consecutive_bad} consecutive steps had a NaN/inf loss (last samples: {result['ids']}). "
                            f"The last good state is saved in '{path}'. Lower train.lr, check these samples with "
                            "`vlm data check`, or raise train.max_bad_steps."
                        )
                else:
                    consecutive_bad = 0
                    scheduler.step()
                    state["step"] += 1
                    _log_step(state, result, scheduler, trackers, progress, config, tokens_seen, started, env)
                    if eval_loader is not None and config.train.eval_every \
                            and state["step"] % config.train.eval_every == 0:
                        eval_loss = evaluate_loss(strategy, eval_loader, config, env)
                        trackers.log({"eval/loss": eval_loss}, state["step"])
                        progress.write(f"step {state['step']}: eval loss {eval_loss:.4f}")
                    if not stopped and config.train.save_every and state["step"] % config.train.save_every == 0 \
                            and state["step"] < config.train.max_steps:
                        checkpoint()
                if stopped or state["step"] >= config.train.max_steps:
                    break
        progress.close()
        if stopped:
            path = checkpoint()
            if env.is_main:
                print(f"Stopped by a signal at step {state['step']}; resume with train.resume_from={path}", flush=True)
            trackers.finish()
            return {"steps": state["step"], "stopped": True, "checkpoint": str(path)}
        return _finish(strategy, config, env, state, eval_loader, trackers, started, output_dir, publisher)
    finally:
        if publisher is not None:  # queued pushes finish and temporary snapshots go, on every path
            publisher.close()


def _micro_batches(
    loader: DataLoader, sampler: Any, dataset: ConversationDataset, state: dict[str, Any], per_step: int,
    batch_size: int,
) -> Iterator[list[dict[str, Any]]]:
    """This process's micro-batches, `per_step` at a time, epoch after epoch, from the data position in
    `state` (epoch, batches_in_epoch), which it keeps current so a checkpoint resumes exactly here. A
    partial step at the end of an epoch is dropped, like `drop_last`."""
    while True:
        sampler.set_position(state["epoch"], state["batches_in_epoch"] * batch_size)
        dataset.set_epoch(state["epoch"])
        batches, yielded = iter(loader), False
        while len(micro := [b for _, b in zip(range(per_step), batches)]) == per_step:
            state["batches_in_epoch"] += per_step
            yielded = True
            yield micro
        if not yielded and state["batches_in_epoch"] == 0:
            raise ValueError(
                f"One optimizer step needs {per_step} batch(es) of {batch_size} per process, but this process's "
                "share of the data has fewer; lower train.batch_size or train.grad_accum."
            )
        state["epoch"] += 1
        state["batches_in_epoch"] = 0


def _first_readable_batch(dataset: ConversationDataset, pad_token_id: int) -> dict[str, Any]:
    """A one-sample batch of the first sample that loads: what a micro-batch whose samples all fail to load
    is replaced by (at weight 0, so every rank still runs the same collectives). Found before step 1, so
    a run whose data cannot be loaded at all stops there, in one line."""
    for index in range(len(dataset)):
        item = dataset[index]
        if "skipped" not in item:
            return Collator(pad_token_id, "right")([item])
    raise DataError(f"None of the {len(dataset)} training samples could be loaded; run `vlm data check` on them.")


def _step(strategy: Strategy, model: VLM, micro: list[dict[str, Any]], config: Config, env: DistEnv,
          state: dict[str, Any], stop: StopRequest, last_good: list[dict[str, Any]]) -> dict[str, Any]:
    """One optimizer step over `micro` (this rank's micro-batches). Collectives, in the same order on every
    rank: the global token count, one finiteness check per micro-batch, the loss / stop totals."""
    for batch in micro:
        for item in batch["skipped"]:
            state["skipped"][item["category"]] = state["skipped"].get(item["category"], 0) + 1
            logger.warning("Skipping sample '%s': %s", item["skipped"], item["detail"])
    local_tokens = [supervised_tokens(b) for b in micro]
    counts = all_reduce_sum(torch.tensor([float(sum(local_tokens))], dtype=torch.float64), env)
    # An integer tensor: FSDP's mixed-precision policy casts floating forward inputs to bf16.
    global_tokens = torch.tensor(max(int(counts[0]), 1), device=env.device)
    loss_sum, bad, ids = 0.0, False, []
    for i, batch in enumerate(micro):
        ids += list(batch.get("ids", []))
        if "input_ids" in batch:
            last_good[:] = [batch]
        else:  # every sample of this micro-batch was unreadable: rerun a good one at weight 0
            batch = _zero_weight(last_good[0])
        inputs = to_device(with_placeholder(model_inputs(batch), model.vision, config.data.cache_features),
                           env.device)
        with strategy.micro_batch(last=i == len(micro) - 1):
            with strategy.autocast():
                out = strategy.model(**inputs, num_items_in_batch=global_tokens)
            nonfinite = all_reduce_sum(torch.tensor([float(not torch.isfinite(out.loss.detach()))]), env)
            bad = bad or float(nonfinite[0]) > 0
            if not bad:
                strategy.backward(out.loss)
                loss_sum += float(out.loss.detach()) * float(global_tokens)
            elif strategy.backward_every_micro_batch:
                # DeepSpeed's accumulation boundary needs a backward: a finite, zero-weight one.
                replay = to_device(with_placeholder(model_inputs(_zero_weight(last_good[0])), model.vision,
                                                    config.data.cache_features), env.device)
                with strategy.autocast():
                    strategy.backward(strategy.model(**replay, num_items_in_batch=global_tokens).loss)
    totals = all_reduce_sum(torch.tensor([loss_sum, float(stop.requested)], dtype=torch.float64), env)
    result = {"bad": bad, "ids": ids, "tokens": sum(local_tokens), "stop": float(totals[1]) > 0}
    if bad:
        strategy.skip_step()
        return result
    result["grad_norm"] = strategy.step(config.train.max_grad_norm)
    result["loss"] = float(totals[0]) / float(global_tokens)
    return result


def _zero_weight(batch: dict[str, Any]) -> dict[str, Any]:
    """The same inputs with no supervised token: the forward and backward run, the gradient is zero."""
    return {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}


def _log_step(state: dict[str, Any], result: dict[str, Any], scheduler: Any, trackers: "Trackers",
              progress: Progress, config: Config, tokens_seen: int, started: float, env: DistEnv) -> None:
    lr = scheduler.get_last_lr()[0]
    rate = tokens_seen * env.world_size / max(time.perf_counter() - started, 1e-9)
    progress.set_postfix(loss=f"{result['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}")
    progress.update(1)  # after the fields: outside a terminal, update prints the line
    state["history"].append({"step": state["step"], "loss": result["loss"], "lr": lr,
                             "grad_norm": result["grad_norm"]})
    if state["step"] % config.train.log_every == 0 or state["step"] == 1:
        trackers.log({"train/loss": result["loss"], "train/lr": lr, "train/grad_norm": result["grad_norm"],
                      "train/tokens_per_s": rate}, state["step"])


def _finish(strategy: Strategy, config: Config, env: DistEnv, state: dict[str, Any], eval_loader: DataLoader | None,
            trackers: "Trackers", started: float, output_dir: Path,
            publisher: TrainingPublisher | None) -> dict[str, Any]:
    """Final eval, then a full, unsharded `final/` folder written by rank 0."""
    history = state["history"]
    summary: dict[str, Any] = {
        "steps": state["step"],
        "train_seconds": time.perf_counter() - started,
        "first_loss": history[0]["loss"] if history else float("nan"),
        "final_loss": _tail_mean([h["loss"] for h in history]) if history else float("nan"),
        "skipped_samples": state["skipped"],
        "bad_steps": len(state["bad_steps"]),
        "strategy": strategy.name,
        "world_size": env.world_size,
    }
    if eval_loader is not None:
        summary["eval_loss"] = evaluate_loss(strategy, eval_loader, config, env)
        trackers.log({"eval/loss": summary["eval_loss"]}, state["step"])
    full = strategy.full_state_dict()  # collective for sharded strategies
    if env.is_main:
        model = strategy.unwrapped() if strategy.replicated else build_model(config)[0]
        if not strategy.replicated:
            model.load_state_dict(full)
        save_final(model, output_dir / "final", merge=config.export.merge_lora,
                   base=config.model.init_from or config.model.pretrained)
        details = {"history": history, "bad_step_samples": state["bad_steps"]}
        (output_dir / "train_summary.json").write_text(json.dumps({**summary, **details}, indent=2))
        print(json.dumps(summary), flush=True)
        metrics = {k: summary[k] for k in ("final_loss", "eval_loss") if k in summary}
        publisher.on_end(output_dir / "final", metrics)  # model card; the hub push when hub.push is set
    barrier(env)
    trackers.finish()
    return {**summary, "history": history}


def _tail_mean(values: list[float], fraction: float = 0.1) -> float:
    tail = values[-max(1, math.ceil(len(values) * fraction)) :]
    return sum(tail) / len(tail)
