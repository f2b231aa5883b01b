"""`vlm serve` / `vlm chat`: an OpenAI-compatible server with dynamic batching, and a browser chat page."""

from .api import ApiError, Limits
from .server import VLMServer

__all__ = ["ApiError", "Limits", "VLMServer"]
