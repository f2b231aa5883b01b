"""Typed run configuration: YAML file + dotted command-line overrides, validated on load.

Every key is a dataclass field, so an unknown key or a value of the wrong type fails
before any model is built, with a message that names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem a person can fix; the message names the key."""


@dataclass
class ModelConfig:
    vision: str = ""
    """Vision tower: `timm:<name>`, `hf:<hub id>`, or a local timm / transformers folder."""
    lm: str = ""
    """Causal LM: a hub id or a local folder (any AutoModelForCausalLM)."""
    pretrained: Optional[str] = None
    """A saved VLM folder (e.g. the align stage's `final/`) to start from instead of the backbones."""
    init_from: Optional[str] = None
    """The documented name for `pretrained` (stage 2 starts from stage 1's `final/`); set one of the two."""
    fusion: str = "projector"
    """Fusion strategy: `early`, `projector`, `resampler`, `cross_attention` or `late` (vlm/fusion/)."""
    projector: str = "mlp2x_gelu"
    pixel_shuffle_factor: int = 2
    vision_feature_layer: int = -2
    """Which encoder block's output feeds the fusion; -2 is the penultimate, as in LLaVA."""
    vision_drop_prefix_tokens: bool = True
    """Drop CLS / register tokens so only patch tokens reach the LM."""
    image_token: str = "<image>"
    trust_remote_code: bool = False
    cross_attn_every_n_layers: int = 4
    """`fusion: cross_attention`: a gated cross-attention block before every n-th LM layer (1: every layer)."""
    cross_attn_heads: Optional[int] = None
    """`fusion: cross_attention`: attention heads of each block; by default the LM's."""
    resampler_depth: int = 0
    """`fusion: cross_attention`: Perceiver-resampler layers before the blocks (0: patch tokens, linearly projected);
    `fusion: resampler`: its layers (0 means 2)."""
    resampler_latents: int = 64
    """`fusion: cross_attention` with a resampler, or `fusion: resampler`: visual tokens per image (learned latents)."""


@dataclass
class DataFile:
    """One entry of `data.train_files` written as a mapping: `{path: ..., weight: 2.0}`."""

    path: str = ""
    """A data file or dataset folder (any format `vlm/data/formats.py` reads)."""
    weight: float = 1.0
    """How often each of its samples is seen per epoch: 2.0 twice, 0.5 a fixed random half."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("A data.train_files entry written as a mapping needs a 'path'.")
        if self.weight <= 0:
            raise ConfigError(f"data.train_files entry '{self.path}': weight must be > 0, got {self.weight}.")


@dataclass
class DataConfig:
    train_files: list[Union[str, DataFile]] = field(default_factory=list)
    """Plain paths, or `{path: ..., weight: ...}` mappings for a weighted mixture."""
    eval_files: list[Union[str, DataFile]] = field(default_factory=list)
    image_root: Optional[str] = None
    """Image paths are relative to this folder; by default to each data file's folder."""
    max_length: int = 2048
    """Longest sample in tokens, image tokens included; longer samples are skipped and counted."""
    strict: bool = False
    """Stop at the first bad sample instead of skipping and counting it."""
    truncate_text: bool = False
    """Cut an over-long sample's text after its last image token instead of skipping it."""
    group_by_length: bool = False
    """Batch samples of similar length together (less padding); deterministic per seed and epoch."""
    caption_prompt: str = "<image>\nDescribe the image briefly."
    """User turn for captioning tables (`image`, `caption`); the caption is the answer."""
    vqa_prompt: str = "<image>\n{question}"
    """User turn for VQA tables (`image`, `question`, `answer`|`answers`); `{question}` is filled in."""
    max_image_pixels: Optional[int] = 89_478_485
    """Images declaring more pixels (width x height, read from the header before decoding) are skipped and
    counted as `image_too_large`; the default is Pillow's own limit (~89M, a 9459x9459 image). null: no limit."""
    num_workers: int = 0
    cache_features: bool = False
    """Compute the frozen encoder's outputs once, store them on disk, and skip the encoder afterwards."""
    cache_dir: Optional[str] = None
    """Where the feature cache lives (default: `output_dir/feature_cache`); safe to share between runs."""

    def __post_init__(self) -> None:
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise ConfigError(f"data.max_image_pixels must be a positive pixel count or null, got {self.max_image_pixels}.")


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
    report_to: list[Literal["tensorboard", "wandb", "none"]] = field(default_factory=lambda: ["tensorboard"])
    """Where metrics go: one name or a list, as with transformers' Trainer (`[tensorboard, wandb]`);
    `none` or `[]`: nowhere."""
    image_dropout: float = 0.0
    """Drop each training image (and its `<image>` tag) with this probability, so the model learns to answer without it."""
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


@dataclass
class HubConfig:
    push: bool = False
    """Push the final model (and, with `strategy: every_save`, each save) to a model hub in the background."""
    repo_id: Optional[str] = None
    """Target repository, `org/name` (or `name` under your own account); required when `push` is true."""
    strategy: Literal["end", "every_save"] = "end"
    """`end`: push `final/` once; `every_save`: also push every saved checkpoint, newest wins."""
    private: bool = False
    """Create the repository as private (ignored when it already exists)."""
    revision: Optional[str] = None
    """Branch to push to (created if missing); default `main`."""
    endpoint: Optional[str] = None
    """Hub URL; default `HF_ENDPOINT` or https://huggingface.co. The token comes from `HF_TOKEN` / `hf auth login`."""

    def __post_init__(self) -> None:
        if self.push and not self.repo_id:
            raise ConfigError("hub.push is true but hub.repo_id is not set; set hub.repo_id=ORG/NAME or hub.push=false.")
        if self.repo_id:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(self.repo_id)
            except HFValidationError as err:
                raise ConfigError(f"hub.repo_id={self.repo_id!r} is not a valid repository id: {err}") from None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    output_dir: str = "outputs/run"


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply `dotted.key=value` overrides, and validate the result."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file '{path}' does not exist.")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"Config file '{path}' must hold a mapping of keys, got {type(raw).__name__}.")
    for item in overrides:
        _apply_override(raw, item)
    return from_dict(Config, raw)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"Override '{item}' must look like 'section.key=value' (e.g. train.lr=1e-4).")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Override '{item}': '{part}' is not a section.")
    node[parts[-1]] = yaml.safe_load(value)


def from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, naming the offending key on any mismatch."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"'{where}' must be a mapping of keys, got {raw!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(
                f"Unknown config key '{prefix}{key}'.{hint} Valid keys under {where}: {', '.join(names)}."
            )
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value or {}, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if isinstance(value, dict):  # e.g. Union[str, DataFile]: a mapping picks the dataclass
            inner = [a for a in inner if dataclasses.is_dataclass(a)] or inner
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"Config key '{key}' must be one of {list(args)}, got {value!r}.")
        return value
    if origin is list:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"Config key '{key}' must be a list, got {value!r}.")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"Config key '{key}' must be true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"Config key '{key}' must be an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, str):
            try:  # YAML reads `1e-4` (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"Config key '{key}' must be a number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"Config key '{key}' must be a string, got {value!r}.")
        return value
    raise ConfigError(f"Config key '{key}' has an unsupported type {tp}.")  # pragma: no cover
