"""Train vision-language models: a frozen vision encoder and a causal LM joined by a swappable fusion."""

from .config import Config, ConfigError, load_config
from .model import VLM

__all__ = ["VLM", "Config", "ConfigError", "load_config"]
__version__ = "0.1.0"
