"""Train vision-language models: a frozen vision encoder and a causal LM joined by a swappable fusion."""

from .config import Config, ConfigError, load_config
from .factory import build, load
from .model import VLM
from .pipeline import Pipeline
from .processor import VLMProcessor

__all__ = ["VLM", "VLMProcessor", "Pipeline", "build", "load", "Config", "ConfigError", "load_config"]
__version__ = "0.1.0"
