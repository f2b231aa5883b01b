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
from .config_train import DpoConfig, ExportConfig, FreezeConfig, LoraConfig, TrainConfig  # noqa: F401 - re-exported


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

    def __post_init__(self) -> None:
        if self.train.objective == "dpo" and self.data.packing:
            raise ConfigError("train.objective=dpo scores each chosen / rejected reply as its own row; "
                              "set data.packing=false.")


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
