"""Typed run configuration: YAML file + dotted command-line overrides, validated on load.

Every key is a dataclass field, so an unknown key or a value of the wrong type fails before any model
is built, with a message that names the key. Each fusion strategy's options are its own section,
`model.<strategy>`, defined and registered in the strategy's file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

import yaml

from .config_parsing import ConfigError, apply_override, fields_from_dict, from_dict


class FusionOptions:
    """Base of a fusion strategy's options: a dataclass in the strategy's own file, read from the
    `model.<strategy name>` section and registered with the strategy (`vlm.fusion.register_fusion`)."""

    legacy_keys: ClassVar[dict[str, str]] = {}
    """Flat `model.*` keys of earlier versions -> this section's key: named in the error for an old
    config file, and translated when an older saved folder is loaded."""

    @classmethod
    def from_legacy(cls, flat: dict[str, Any]) -> dict[str, Any]:
        """This section's values from an older saved folder's flat model config."""
        return {new: flat[old] for old, new in cls.legacy_keys.items() if old in flat}


_FUSIONS: dict[str, Optional[type[FusionOptions]]] = {}
"""Every registered fusion strategy -> its options class (None: it has none). Filled as `vlm.fusion`
is imported (the `vlm` package imports it), so a new strategy never edits this file."""


def register_fusion_options(name: str, options: Optional[type[FusionOptions]]) -> None:
    """Make `model.fusion: <name>` valid and `model.<name>` its options section (called by `register_fusion`)."""
    _FUSIONS[name] = options


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
    """Fusion strategy: `early`, `projector`, `resampler`, `cross_attention` or `late` (vlm/fusion/); its
    options are the section of the same name (e.g. `model.cross_attention: {every_n_layers: 4}`)."""
    vision_feature_layer: int = -2
    """Which encoder block's output feeds the fusion; -2 is the penultimate, as in LLaVA."""
    vision_drop_prefix_tokens: bool = True
    """Drop CLS / register tokens so only patch tokens reach the LM."""
    image_token: str = "<image>"
    trust_remote_code: bool = False
    options: dict[str, Any] = field(default_factory=dict, metadata={"config_key": False})
    """Each strategy's options by strategy name, written as `model.<name>: {...}` (not `model.options`);
    every registered strategy's section is present, with its defaults where not given."""

    def __post_init__(self) -> None:
        if self.fusion not in _FUSIONS:
            raise ConfigError(
                f"model.fusion='{self.fusion}' is not a registered strategy; choose one of {sorted(_FUSIONS)}."
            )
        self.options = {
            name: self.options.get(name) or cls() for name, cls in sorted(_FUSIONS.items()) if cls is not None
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], prefix: str) -> "ModelConfig":
        """From a mapping (`config_parsing.from_dict` hook): its own keys, plus one options section per
        registered strategy; a flat key of earlier versions is an error naming where it moved."""
        raw = dict(raw)
        for old, new in _legacy_keys().items():
            if _is_legacy(raw, old):
                raise ConfigError(f"{prefix}{old} moved to {' / '.join(new)}; rename it in the config.")
        sections = {name: raw.pop(name) for name in list(raw) if _FUSIONS.get(name) is not None}
        config = fields_from_dict(cls, raw, prefix, extra=sorted(n for n, c in _FUSIONS.items() if c is not None))
        for name, value in sections.items():
            config.options[name] = from_dict(_FUSIONS[name], value or {}, f"{prefix}{name}.")
        return config

    def fusion_options(self) -> Optional[FusionOptions]:
        """The selected strategy's options (None for a strategy without any)."""
        return self.options.get(self.fusion)

    def with_fusion(self, name: str, **changes: Any) -> "ModelConfig":
        """A copy that selects strategy `name`, with `changes` applied to its options section."""
        config = dataclasses.replace(self, fusion=name, options=dict(self.options))
        if changes:
            config.options[name] = dataclasses.replace(config.options[name], **changes)  # filled by __post_init__
        return config


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
class TilingConfig:
    max_tiles: int = 0
    """Any-resolution tiling: split each image into up to this many tiles at the tower's input size, plus
    a thumbnail, on the grid that best fits its aspect ratio and resolution (docs/tiling.md); 0 or 1: off."""

    def __post_init__(self) -> None:
        if self.max_tiles < 0:
            raise ConfigError(f"data.tiling.max_tiles must be >= 0 (0: no tiling), got {self.max_tiles}.")


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
    group_by_modality_length: bool = False
    """As group_by_length, and keep samples with images and text-only samples in separate batches (LLaVA's
    `group_by_modality_length`): a text-only batch then skips the vision tower (bar the placeholder)."""
    packing: bool = False
    """Place each step's `train.batch_size` samples into as few rows of up to `data.max_length` tokens as
    first-fit-decreasing finds; attention and positions stay per sample (docs/data.md#packing)."""
    packing_max_images: Optional[int] = None
    """With packing: at most this many images in one row (with data.tiling: views; null: no limit beyond data.max_length)."""
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
    tiling: TilingConfig = field(default_factory=lambda: TilingConfig())
    """Any-resolution tiling (`data.tiling.max_tiles`); saved with the model, so predict tiles the same way."""

    def __post_init__(self) -> None:
        if self.packing_max_images is not None and self.packing_max_images < 1:
            raise ConfigError(f"data.packing_max_images must be >= 1 or null, got {self.packing_max_images}.")
        if self.cache_features and self.tiling.max_tiles > 1:
            raise ConfigError("data.cache_features caches one view per image, so it cannot serve data.tiling; "
                              "set data.cache_features=false or data.tiling.max_tiles=0.")
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
    train_new_tokens: bool = True
    """Train the rows of the tokens the project brings (image token; ChatML's when it supplies the chat
    template) in the input embedding and, when untied, the output head; every other row stays frozen.
    Without it a base LM can never learn to emit `<|im_end|>` under LoRA (docs/lora.md)."""
    trainable_tokens: list[str] = field(default_factory=list)
    """More tokens whose rows train the same way, e.g. special tokens your own chat template uses."""


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
        apply_override(raw, item)
    return from_dict(Config, raw)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data, in the shape `load_config` reads (strategy sections under `model.`)."""
    out = dataclasses.asdict(cfg)
    model = out if isinstance(cfg, ModelConfig) else out.get("model") if isinstance(cfg, Config) else None
    if model is not None:
        model.update(model.pop("options"))
    return out


def saved_model_config(raw: dict[str, Any]) -> ModelConfig:
    """The model config stored in a saved folder's config.json; folders saved before the per-strategy
    sections (flat keys such as `cross_attn_every_n_layers`) are translated to them."""
    raw = dict(raw)
    flat = {key: raw.pop(key) for key in _legacy_keys() if _is_legacy(raw, key)}
    if flat:
        for name, cls in _FUSIONS.items():
            if cls is not None and cls.from_legacy(flat) and not isinstance(raw.get(name), dict):
                raw[name] = cls.from_legacy(flat)
    return from_dict(ModelConfig, raw, "model.")


def _legacy_keys() -> dict[str, list[str]]:
    """Each flat key of earlier versions -> the `model.<strategy>.<key>` names it became."""
    moved: dict[str, list[str]] = {}
    for name, cls in sorted(_FUSIONS.items()):
        for old, new in (cls.legacy_keys if cls is not None else {}).items():
            moved.setdefault(old, []).append(f"model.{name}.{new}")
    return moved


def _is_legacy(raw: dict[str, Any], key: str) -> bool:
    """`key` is there in its flat form (a section of the same name, like `projector`, is a mapping or empty)."""
    return key in raw and not isinstance(raw[key], dict) and not (key in _FUSIONS and raw[key] is None)
