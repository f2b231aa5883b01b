"""A saved VLM folder's config.json, tokenizer and tiling: read by `VLM.from_pretrained` and
`VLMProcessor.from_pretrained` alike, so either loads on its own from the same files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .config import ModelConfig, saved_model_config
from .lm import upgrade_chat_template


def read_saved_config(directory: Path) -> tuple[dict[str, Any], ModelConfig]:
    """config.json of a saved VLM folder -> (its metadata: vision_library, tokens_per_image, ...; the model
    config, with `pretrained` / `init_from` cleared since the folder is now the source)."""
    path = Path(directory) / "config.json"
    meta = json.loads(path.read_text()) if path.is_file() else {}
    if "model" not in meta:
        raise FileNotFoundError(f"'{directory}' is not a saved VLM folder (no config.json with a model section).")
    config = saved_model_config(meta["model"])  # translates keys of older folders
    config.pretrained = config.init_from = None
    return meta, config


def load_saved_tokenizer(directory: Path, config: ModelConfig) -> PreTrainedTokenizerBase:
    """The folder's tokenizer; a folder saved with the old string-only chat template gets the current one."""
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=config.trust_remote_code)
    upgrade_chat_template(tokenizer, config.image_token)
    return tokenizer


PROCESSOR_CONFIG = "processor_config.json"
"""The processor's own settings in a saved folder: its tiling (`data.tiling`), written only when tiling is on."""


def saved_tiling(directory: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The folder's tiling, `{"max_tiles": n, "tile_size": [h, w]}` or `{}` (none): from processor_config.json,
    or from config.json in folders saved before the processor wrote its own file."""
    path = Path(directory) / PROCESSOR_CONFIG
    if path.is_file():
        return json.loads(path.read_text()).get("tiling", {})
    return meta.get("tiling", {})
