"""The trained model as a whole: built (`build_model`), gathered from its shards, and written as `final/` is.

One place for what `final/` and the `hub.strategy: every_save` snapshots hold: a VLM folder (LoRA merged), or
an adapter folder with `export.merge_lora: false`.
"""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..factory import build
from ..model import VLM
from ..processor import VLMProcessor
from .distributed import DistEnv
from .freezing import apply_stage
from .lora import save_final
from .sharding.base import Strategy


def build_model(config: Config) -> tuple[VLM, VLMProcessor]:
    """The VLM with its trainable parts decided (stage, freezing), and its processor with the data settings;
    the same call at start and at export."""
    model, processor = build(config.model, config.data)
    apply_stage(model, config.train)  # stage, train.freeze, and LoRA adapters when train.lora.enabled
    return model, processor


def full_model(strategy: Strategy, env: DistEnv, config: Config, separate: bool) -> VLM | None:
    """Collective: on the main process, a VLM holding every trained weight, unsharded (None elsewhere).
    `separate`: never the model being trained (merging LoRA into it or saving cannot touch training)."""
    full = strategy.full_state_dict()
    if not env.is_main:
        return None
    if strategy.replicated and not separate:
        return strategy.unwrapped()
    model = build_model(config)[0]
    model.load_state_dict(full)
    return model


def write_model_folder(model: VLM, processor: VLMProcessor, folder: Path, config: Config) -> Path:
    """What `final/` holds: a VLM folder, LoRA merged, or an adapter folder with export.merge_lora=false."""
    return save_final(model, processor, folder, merge=config.export.merge_lora,
                      base=config.model.init_from or config.model.pretrained)
