"""The `train:` section of the run configuration (vlm/config.py holds the rest and re-exports these): what
trains (stage, freezing, LoRA), the objective (SFT or DPO), the schedule, the speed options, the strategy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from .config_parsing import ConfigError


@dataclass
class FreezeConfig:
    vision: Optional[bool] = None
    """true: keep the vision tower frozen; false: train it; unset: the stage decides."""
    fusion: Optional[bool] = None
    """true: keep the fusion module frozen; false: train it; unset: the stage decides."""
    lm: Optional[bool] = None
    """true: keep the LM frozen; false: train it; unset: the stage decides."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters on the LM (its own weights stay frozen); the fusion trains fully."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapters' input."""
    target_modules: Optional[list[str]] = None
    """Module names (or name suffixes) to adapt; default every linear layer of the LM except lm_head."""
    quantize: Optional[Literal["4bit"]] = None
    """`4bit`: QLoRA, the frozen LM in NF4 through bitsandbytes (needs CUDA)."""
    train_new_tokens: bool = True
    """Train the rows of the tokens the project brings (image token; ChatML's when it supplies the chat
    template) in the input embedding and, when untied, the output head; every other row stays frozen.
    Without it a base LM can never learn to emit `<|im_end|>` under LoRA (docs/lora.md)."""
    trainable_tokens: list[str] = field(default_factory=list)
    """More tokens whose rows train the same way, e.g. special tokens your own chat template uses."""


@dataclass
class DpoConfig:
    """Direct preference optimisation (train.objective=dpo; docs/preference.md). The reference is the policy
    as training starts: the LM with its LoRA adapters disabled when only adapters train, else a frozen copy,
    or (`precompute_reference`) log-probabilities computed once before step 1."""

    beta: float = 0.1
    """How far the policy may move from the reference (TRL's `beta`; IPO's tau)."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """`sigmoid`: DPO (Rafailov et al.); `ipo`: IPO, on log-ratios averaged per token (as TRL computes it)."""
    sft_weight: float = 0.0
    """RPO: add this weight x the chosen reply's NLL per token (each pair's mean, averaged over pairs)."""
    precompute_reference: bool = False
    """Score every training pair with the initial model once, before step 1, and keep no reference model."""

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"train.dpo.beta must be > 0, got {self.beta}.")
        if not self.sft_weight >= 0:
            raise ConfigError(f"train.dpo.sft_weight must be >= 0, got {self.sft_weight}.")


@dataclass
class ExportConfig:
    merge_lora: bool = True
    """With LoRA: write merged LM weights to `final/` (loads without peft); false: adapter + fusion only."""


@dataclass
class TrainConfig:
    stage: Literal["align", "finetune", "custom"] = "align"
    """`align` trains the fusion only; `finetune` the fusion and the LM; `custom` what `train.freeze` says."""
    freeze: FreezeConfig = field(default_factory=lambda: FreezeConfig())
    """Per-component overrides of the stage's plan (`custom` needs all three)."""
    lora: LoraConfig = field(default_factory=lambda: LoraConfig())
    """Low-rank adapters on the LM instead of training its weights (peft)."""
    objective: Literal["sft", "dpo"] = "sft"
    """`sft`: next-token loss on the answers; `dpo`: preference pairs (prompt, chosen, rejected), `train.dpo`."""
    dpo: DpoConfig = field(default_factory=lambda: DpoConfig())
    max_steps: int = 1000
    batch_size: int = 8
    eval_batch_size: Optional[int] = None
    grad_accum: int = 1
    lr: float = 2e-5
    fusion_lr: Optional[float] = None
    """Learning rate of the fusion module; defaults to `lr`."""
    lm_lr: Optional[float] = None
    """Learning rate of the LM (or its LoRA adapters); defaults to `lr`."""
    vision_lr: Optional[float] = None
    """Learning rate of the vision tower when it trains; defaults to `lr`."""
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """`auto`: bf16 where the device supports it, fp32 otherwise (CPU)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more compute) for the components below."""
    gradient_checkpointing_components: list[str] = field(default_factory=lambda: ["lm"])
    """Which components `gradient_checkpointing` applies to: any of `lm`, `fusion`, `vision` (a trainable tower)."""
    compile: bool = False
    """`torch.compile` the LM and the fusion; falls back to eager, with one warning, where unsupported."""
    log_every: int = 10
    eval_every: int = 0
    """Evaluate on `data.eval_files` every N optimizer steps (0: only at the end)."""
    eval_generate: bool = False
    """At every evaluation also answer `data.eval_files` by generation, as `vlm predict`, and log VQA accuracy
    (overall and per type), BLEU-4 and CIDEr-D as `eval/*` (rank 0; not with fsdp2 / zero3)."""
    eval_max_new_tokens: int = 32
    """`train.eval_generate`: the answer length cap."""
    eval_generate_samples: Optional[int] = None
    """`train.eval_generate`: answer only the first N eval samples (None: all of them)."""
    eval_retention: bool = False
    """At the end, measure how much of the LM's text-only chat the model kept (vlm/eval/retention.py: greedy
    replies to 120 fixed prompts against the base LM's); in train_summary.json and the model card (rank 0)."""
    early_stopping_patience: int = 0
    """Stop when the eval loss has not improved by more than `early_stopping_min_delta` for this many
    consecutive evaluations (every `train.eval_every` steps); 0: never. The run then finishes normally
    (final eval, `final/`); `train.max_steps` stays the cap."""
    early_stopping_min_delta: float = 0.0
    """How much lower than the best so far an eval loss must be to count as an improvement."""
    report_to: list[Literal["tensorboard", "wandb", "none"]] = field(default_factory=lambda: ["tensorboard"])
    """Where metrics go: one name or a list, as with transformers' Trainer (`[tensorboard, wandb]`);
    `none` or `[]`: nowhere."""
    image_dropout: float = 0.0
    """Drop each training image (and its `<image>` tag) with this probability, so the model learns to answer without it."""
    dropped_image: Literal["remove", "blank"] = "remove"
    """Where a dropped image goes: `remove` (image and tag, the LM reads plain text) or `blank` (a grey image
    takes its place, so the fusion still runs and can learn the no-picture case; vlm/data/dropout.py)."""
    image_corruption: float = 0.0
    """ModDrop-style: corrupt each kept training image with this probability (vlm/data/dropout.py); no feature cache."""
    strategy: Literal["auto", "single", "ddp", "fsdp2", "zero2", "zero3"] = "auto"
    """How training is spread over processes. `auto`: what `accelerate launch --config_file` asked for
    (FSDP -> fsdp2, DeepSpeed -> zero2 / zero3 by its stage), else `ddp` with several processes, else `single`."""
    deepspeed_config: Optional[str] = None
    """`zero2` / `zero3`: a DeepSpeed JSON to start from (batch sizes, accumulation and precision are filled in)."""
    offload_optimizer: bool = False
    """`zero2` / `zero3`: keep optimizer state in CPU memory."""
    offload_params: bool = False
    """`zero3`: keep parameters in CPU memory between uses."""
    shard_vision: bool = False
    """`fsdp2`: shard the frozen vision tower too (large towers); by default it is replicated. (ZeRO-3 always partitions it.)"""
    save_every: int = 0
    """Write `output_dir/checkpoint-<step>/` every N optimizer steps (0: only when stopped early)."""
    save_total_limit: Optional[int] = None
    """Keep only the newest N checkpoints (the newest complete one is never deleted)."""
    resume_from: Optional[str] = None
    """`latest` (newest checkpoint in output_dir) or a checkpoint folder; continues exactly where it stopped."""
    max_bad_steps: int = 10
    """Abort after this many consecutive steps with a NaN / inf loss (each one skipped, not applied)."""

    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):  # set in code rather than through the config loader
            self.report_to = [self.report_to]
        if "none" in self.report_to and len(set(self.report_to)) > 1:
            raise ConfigError(f"train.report_to={self.report_to} mixes 'none' with trackers; drop one of them.")
        if self.early_stopping_patience < 0:
            raise ConfigError(f"train.early_stopping_patience must be >= 0 (0: never stop early), "
                              f"got {self.early_stopping_patience}.")
        if self.early_stopping_patience and not self.eval_every:
            raise ConfigError(f"train.early_stopping_patience={self.early_stopping_patience} counts periodic "
                              "evaluations, but train.eval_every is 0; set train.eval_every (e.g. 100).")
        if self.eval_max_new_tokens < 1:
            raise ConfigError(f"train.eval_max_new_tokens must be >= 1, got {self.eval_max_new_tokens}.")
        if self.eval_generate_samples is not None and self.eval_generate_samples < 1:
            raise ConfigError(f"train.eval_generate_samples must be >= 1 (or null: all), "
                              f"got {self.eval_generate_samples}.")
        if not self.early_stopping_min_delta >= 0:
            raise ConfigError(f"train.early_stopping_min_delta must be >= 0, got {self.early_stopping_min_delta}.")
        for key in (k for k in ("image_dropout", "image_corruption") if not 0 <= getattr(self, k) <= 1):
            raise ConfigError(f"train.{key} is a probability in [0, 1], got {getattr(self, key)}.")
        if self.objective == "dpo" and self.dpo.precompute_reference and (self.image_dropout or self.image_corruption):
            raise ConfigError("train.dpo.precompute_reference scores each pair once, but train.image_dropout / "
                              "train.image_corruption change its image every epoch; set them to 0 or drop the "
                              "precomputation.")
