"""The training recipe: one code path for one process, DDP, FSDP2 and DeepSpeed ZeRO-2/3 (see `sharding/`).

`Trainer` reads top to bottom like torchtune's recipes: `setup()` builds model, data, strategy and
optimizer (and resumes), `run()` repeats `train_step()` with `evaluate()` and `save()` on schedule,
`finish()` writes `final/`, `cleanup()` releases what setup started. `train(config)` is the entry point.

One optimizer step is `vlm/train/step.py`'s `train_step` (read it first). A non-finite loss skips the
step; SIGTERM / Ctrl-C saves a checkpoint and returns. Launcher settings (`accelerate launch`'s variables)
are resolved into the config before the Trainer is built, so what it reads is what runs.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import yaml
from transformers import set_seed

from ..config import Config, config_to_dict
from ..data.batch import Batch
from ..data.dataset import ConversationDataset
from ..data.feature_cache import FeatureCache, encoder_fingerprint
from ..data.formats import read_samples
from ..data.dropout import blank_image, check_image_corruption
from ..data.sample import DataError, Sample
from ..data.samplers import ResumableSampler, training_sampler
from ..hub.training_publisher import LATEST_DIR, TrainingPublisher
from ..model import VLM
from ..progress import progress_bar
from .batches import check_loadable, make_loader, micro_batches
from .checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from .distributed import DistEnv, barrier, init_distributed, teardown
from .early_stopping import check_early_stopping, eval_progress
from .eval_generate import check_eval_generate, generation_metrics, tracker_values
from .evaluation import count_skipped, eval_loss, final_retention
from .final import build_model, full_model, write_model_folder
from .launch_env import apply_launcher_settings
from .objective import DPO, SFT, Objective
from .optim import TrainingAborted, Updater, build_optimizer
from .reference import AdaptersOff, Precomputed, describe, frozen_reference
from .sharding import build_strategy
from .signals import StopRequest
from .speed import apply_gradient_checkpointing, maybe_compile
from .state import DataPosition, TrainState
from .step import StepResult, train_step
from .trackers import Trackers

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "TrainingAborted", "build_model", "train"]

GENERATION_SUMMARY = ("vqa_accuracy", "bleu4", "cider_d")  # train.eval_generate's figures in train_summary.json


def train(config: Config, on_step: Optional[Callable[["Trainer"], None]] = None) -> dict[str, Any]:
    """Train as configured; write `output_dir/final/` and return a summary of the run (`on_step`: see `Trainer`)."""
    env = init_distributed()
    trainer = Trainer(apply_launcher_settings(config), env, on_step)
    try:
        trainer.setup()
        return trainer.run()
    finally:
        trainer.cleanup()
        teardown(env)


class Trainer:
    """One training run on this process (every rank runs the same calls in the same order). `on_step(trainer)`,
    if given, is called on every rank after each applied optimizer step (after its periodic evaluation).
    `config` is final: launcher settings already applied (`train()` does it). The model is reached through
    `self.strategy`: `.model` to call (the wrapper), `.unwrapped()` for the VLM itself."""

    def __init__(self, config: Config, env: DistEnv, on_step: Optional[Callable[["Trainer"], None]] = None) -> None:
        self.config = config
        self.env = env
        self.on_step = on_step
        self.stopped_early = False
        self.output_dir = Path(config.output_dir)
        self.state = TrainState()
        self.publisher: TrainingPublisher | None = None
        self.trackers: Trackers | None = None
        self.tokens_seen = 0
        self.eval_skipped: dict[str, int] = {}
        """Unreadable eval samples by category, as of the latest evaluation (train_summary.json)."""
        self.started = time.perf_counter()

    # -- setup ---------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Launcher settings, model, data, strategy and optimizer; the checkpoint to resume from; the run
        folder and trackers."""
        config = self.config
        check_early_stopping(config)
        env = self.env
        set_seed(config.train.seed)
        self.strategy = build_strategy(config, env)
        check_eval_generate(config, self.strategy.name)
        model, self.processor = build_model(config)
        reference = frozen_reference(config, model, env) if config.train.objective == "dpo" else None
        if config.train.gradient_checkpointing:
            apply_gradient_checkpointing(model, config.train.gradient_checkpointing_components)
        maybe_compile(model, config.train.compile)
        self._setup_data(model)
        if config.train.objective == "dpo" and config.train.dpo.precompute_reference:
            reference = Precomputed.score(model, [self.train_set, *self.eval_sets], model.tokenizer.pad_token_id,
                                          config.train.batch_size, self.strategy, env, config.data.cache_features)
        self.strategy.setup(model, lambda m: build_optimizer(m, config))
        self.objective: Objective = SFT()
        if config.train.objective == "dpo":
            self.objective = DPO(config.train.dpo, reference or AdaptersOff())
            if env.is_main:
                logger.info(describe(self.objective.reference))
        self.updater = Updater(self.strategy, config, save=self.save)
        self.state.skipped = dict(self.train_set.problems)
        resume = resolve_resume(config.train.resume_from, self.output_dir)
        if resume is not None:
            self.state, scheduler = load_checkpoint(self.strategy, resume, env)
            self.updater.load_state_dict(scheduler)
            logger.info("Resumed from %s at step %d.", resume, self.state.step)
        if env.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.trackers = Trackers(config, self.output_dir, enabled=env.is_main)
        self.publisher = TrainingPublisher(config, self.output_dir) if env.is_main else None
        if env.is_main:  # last: it tells launchers (and the preemption test) the first step follows at once
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))

    def _setup_data(self, model: VLM) -> None:
        """The feature cache, the training set with its sampler and loader, the eval loader."""
        config, env, processor = self.config, self.env, self.processor
        check_image_corruption(config.train.image_corruption, config.data.cache_features)  # before the cache is built
        cache = self._feature_cache(model) if config.data.cache_features else None
        self.train_set = ConversationDataset.from_files(
            config.data.train_files, processor, config.data.image_root, config.data.strict,
            feature_cache=cache, image_dropout=config.train.image_dropout, seed=config.train.seed, data=config.data,
            dropped_image=config.train.dropped_image, image_corruption=config.train.image_corruption,
            unreadable="replace",
        )
        if len(self.train_set) == 0:
            raise DataError(f"No usable training samples in {config.data.train_files} "
                            f"({dict(self.train_set.problems)}); run `vlm data check` on them.")
        check_loadable(self.train_set)
        pad = model.tokenizer.pad_token_id
        self.sampler = training_sampler(self.train_set, processor, config.train.batch_size, env.world_size,
                                        env.rank, config.train.seed, config.data.group_by_length,
                                        config.data.group_by_modality_length)
        self.train_loader = make_loader(self.train_set, pad, config.train.batch_size, False, config,
                                        self.sampler, packing=config.data.packing)
        self.eval_loader = None
        self.eval_sets: list[ConversationDataset] = []
        self.eval_problems: dict[str, int] = {}
        if config.data.eval_files:
            # Every rank runs every eval forward (FSDP2 and ZeRO-3 gather weights in each): an unreadable sample's
            # place is taken by another at weight 0.
            eval_set = ConversationDataset.from_files(
                config.data.eval_files, processor, config.data.image_root, feature_cache=cache, data=config.data,
                unreadable="stand_in",
            )
            self.eval_problems = dict(eval_set.problems)
            self.eval_sets = [eval_set]
            eval_sampler = ResumableSampler(eval_set, env.world_size, env.rank, shuffle=False, seed=0)
            self.eval_loader = make_loader(eval_set, pad, config.train.eval_batch_size or config.train.batch_size,
                                           False, config, eval_sampler)

    def _feature_cache(self, model: VLM) -> FeatureCache:
        """Encode every training / eval image once (each rank a share), before the first step."""
        config, env = self.config, self.env
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
        if config.train.image_dropout > 0 and config.train.dropped_image == "blank":
            samples.append(Sample("blank", [], [blank_image()]))  # the stand-in every dropped image becomes
        started = time.perf_counter()
        encoded = cache.fill(samples, self.processor, vision, config.train.batch_size, env.rank, env.world_size)
        barrier(env)
        logger.info("Feature cache %s: %d image(s) encoded in %.1fs.", cache.root, encoded,
                    time.perf_counter() - started)
        return cache

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Step until `train.max_steps`, early stopping or a stop request; then `finish()` (or save and return
        when stopped by a signal)."""
        train = self.config.train
        self.started = time.perf_counter()
        self.progress = progress_bar(total=train.max_steps, initial=self.state.step, disable=not self.env.is_main,
                                     desc="train", every=train.log_every, unit="step")
        self.strategy.model.train()
        stopped = False
        with StopRequest() as stop:
            for micro, position in self.batches() if self.state.step < train.max_steps else ():
                result = self.step(micro, position, stop)
                stopped = result.stop
                if not result.bad:
                    self._log(result)
                    if self.eval_loader is not None and train.eval_every and self.state.step % train.eval_every == 0:
                        self.stopped_early = self._periodic_eval()
                    if self.on_step is not None:
                        self.on_step(self)
                    if not stopped and not self.stopped_early and train.save_every \
                            and self.state.step % train.save_every == 0 and self.state.step < train.max_steps:
                        self.save()
                if stopped or self.stopped_early or self.state.step >= train.max_steps:
                    break
        self.progress.close()
        if stopped:
            path = self.save()
            if self.env.is_main:
                print(f"Stopped by a signal at step {self.state.step}; resume with train.resume_from={path}",
                      flush=True)
            self.trackers.finish()
            return {"steps": self.state.step, "stopped": True, "checkpoint": str(path)}
        return self.finish()

    def batches(self) -> Iterator[tuple[list[Batch], DataPosition]]:
        """Each step's micro-batches from the current data position, with the position after them."""
        train = self.config.train
        return micro_batches(self.train_loader, self.sampler, self.train_set, self.state.position,
                             train.grad_accum, train.batch_size)

    def step(self, micro: list[Batch], position: DataPosition, stop: StopRequest) -> StepResult:
        """`train_step` over `micro`, after which the data up to `position` counts as read, whether the update
        is applied or skipped."""
        self.state.position = position  # before a skip's abort saves the state
        result = train_step(self.strategy, self.updater, self.state, micro, self.env,
                            self.config.data.cache_features, stop.requested, self.objective)
        self.tokens_seen += result.tokens
        return result

    def _log(self, result: StepResult) -> None:
        step, lr = self.state.step, self.updater.lr
        rate = self.tokens_seen * self.env.world_size / max(time.perf_counter() - self.started, 1e-9)
        self.progress.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}")
        self.progress.update(1)  # after the fields: outside a terminal, update prints the line
        if step % self.config.train.log_every == 0 or step == 1:
            self.trackers.log({"train/loss": result.loss, "train/lr": lr, "train/grad_norm": result.grad_norm,
                               "train/tokens_per_s": rate, **{f"train/{k}": v for k, v in result.metrics.items()}},
                              step)

    def _periodic_eval(self) -> bool:
        """Evaluate, log and record the eval loss; True when early stopping says to stop here."""
        step, train = self.state.step, self.config.train
        entry = self._evaluate_and_log(step)
        scores = "".join(f", {k.replace('_', ' ')} {entry[k]:.4f}" for k in ("vqa_accuracy", "cider_d") if k in entry)
        self.progress.write(f"step {step}: eval loss {entry['loss']:.4f}{scores}")
        progress = eval_progress(self.state.eval_history, train.early_stopping_min_delta)
        if not train.early_stopping_patience or progress.waited < train.early_stopping_patience:
            return False
        if self.env.is_main:
            best = math.nan if progress.best_loss is None else progress.best_loss
            logger.info("Early stopping at step %d: eval loss has not improved for %d evaluations (best %.4f at "
                        "step %s).", step, progress.waited, best, progress.best_step)
        return True

    def _evaluate_and_log(self, step: int) -> dict[str, Any]:
        """The eval loss (all ranks) and with `train.eval_generate` the generation metrics (rank 0, the
        others wait), appended to the eval history and logged as `eval/<name>`."""
        entry: dict[str, Any] = {"step": step, "loss": self.evaluate()}
        if self.config.train.eval_generate:
            if self.env.is_main:
                metrics = generation_metrics(self.strategy.unwrapped(), self.processor, self.config, step)
                entry.update(tracker_values(metrics))
            barrier(self.env)
        self.state.eval_history.append(entry)
        self.trackers.log({f"eval/{k}": v for k, v in entry.items() if k != "step"}, step)
        return entry

    def evaluate(self) -> float:
        """Mean loss per supervised token over the whole eval set (all ranks); the unreadable eval samples
        are counted in `self.eval_skipped` and logged."""
        loss, skipped = eval_loss(self.strategy, self.eval_loader, self.env, self.config.data.cache_features,
                                  self.objective)
        self.eval_skipped = count_skipped(skipped, self.eval_problems, self.env, self.state.step)
        return loss

    def save(self) -> Path:
        """Collective: a checkpoint of the current state and, with hub.strategy=every_save, `hub-latest/`
        written as `final/` would be (merged or an adapter folder, per export.merge_lora) and pushed."""
        path = save_checkpoint(self.strategy, self.state, self.updater.state_dict(), self.config, self.env,
                               self.output_dir, self.config.train.save_total_limit)
        hub = self.config.hub
        if hub.push and hub.strategy == "every_save":
            model = full_model(self.strategy, self.env, self.config, separate=True)  # collective: fsdp2 / zero3
            if self.env.is_main:
                folder = write_model_folder(model, self.processor, self.output_dir / LATEST_DIR, self.config)
                self.publisher.on_save(folder, self.state.step)
        return path

    # -- the end -------------------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """Final eval, then a full, unsharded `final/` folder written by rank 0; returns the summary."""
        config, env, state, strategy = self.config, self.env, self.state, self.strategy
        history = state.history
        summary: dict[str, Any] = {
            "steps": state.step,
            "train_seconds": time.perf_counter() - self.started,
            "first_loss": history[0]["loss"] if history else float("nan"),
            "final_loss": _tail_mean([h["loss"] for h in history]) if history else float("nan"),
            "skipped_samples": state.skipped,
            "bad_steps": len(state.bad_steps),
            "strategy": strategy.name,
            "world_size": env.world_size,
        }
        if self.eval_loader is not None:  # the periodic eval at this very step (e.g. an early stop) is reused
            if not state.eval_history or state.eval_history[-1]["step"] != state.step:
                self._evaluate_and_log(state.step)
            summary["eval_loss"] = state.eval_history[-1]["loss"]
            summary["eval_skipped_samples"] = self.eval_skipped
            summary.update({f"eval_{k}": v for k, v in state.eval_history[-1].items() if k in GENERATION_SUMMARY})
        best = eval_progress(state.eval_history, config.train.early_stopping_min_delta)
        summary.update(best_eval_step=best.best_step, best_eval_loss=best.best_loss, stopped_early=self.stopped_early)
        model = full_model(strategy, env, config, separate=False)  # collective for sharded strategies
        if env.is_main:
            write_model_folder(model, self.processor, self.output_dir / "final", config)
            if config.train.eval_retention:
                summary["retention"] = final_retention(self.output_dir / "final", config.train.eval_max_new_tokens)
            details = {"history": history, "eval_history": state.eval_history, "bad_step_samples": state.bad_steps}
            (self.output_dir / "train_summary.json").write_text(json.dumps({**summary, **details}, indent=2))
            print(json.dumps(summary), flush=True)
            metrics = {k: summary[k] for k in ("final_loss", "eval_loss", "retention") if k in summary}
            self.publisher.on_end(self.output_dir / "final", metrics)  # model card; the push when hub.push
        barrier(env)
        self.trackers.finish()
        return {**summary, "history": history, "eval_history": state.eval_history}

    def cleanup(self) -> None:
        """On every path: queued hub pushes finish and temporary snapshots go."""
        if self.publisher is not None:
            self.publisher.close()


def _tail_mean(values: list[float], fraction: float = 0.1) -> float:
    tail = values[-max(1, math.ceil(len(values) * fraction)) :]
    return sum(tail) / len(tail)
