"""The one internal sample type every data format is converted into."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from PIL import Image

ROLES = ("system", "user", "assistant")
IMAGE_TAG = "<image>"  # where an image sits in the text; LLaVA's convention
ImageRef = Union[str, Image.Image]


class DataError(ValueError):
    """A data problem a person can fix (an unreadable file, a strict run's bad sample): the message
    names the file or sample and what to do; the CLI prints it as one line, without a traceback."""


class SampleError(DataError):
    """A bad sample: the message names the sample id, the problem and what to do."""

    def __init__(self, sample_id: str, category: str, detail: str) -> None:
        super().__init__(f"sample '{sample_id}': {detail}")
        self.sample_id = sample_id
        self.category = category
        self.detail = detail

    def __reduce__(self) -> tuple:  # rebuilt from its fields when it crosses processes (`data check --workers`)
        return type(self), (self.sample_id, self.category, self.detail)


@dataclass
class Sample:
    """A conversation with images.

    messages: [{"role": "system" | "user" | "assistant", "content": str}], where each
    image is marked in the text by the image token (`<image>`), in the order of `images`.
    images: absolute file paths or already-decoded PIL images.
    meta: format-specific extras kept for evaluation (e.g. "type", "answers", "task").
    """

    id: str
    messages: list[dict[str, str]]
    images: list[ImageRef] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    source_format: str = ""
    """Which reader produced it (`llava`, `messages`), for data reports."""
    coerced: list[str] = field(default_factory=list)
    """Where a number stood in for text and was used as text (e.g. `answer: 2`), so reports can count it."""
    rejected: str | None = None
    """A preference pair's rejected reply (its chosen one is the last assistant message); None: not a pair."""

    def rejected_messages(self) -> list[dict[str, str]]:
        """The conversation with the rejected reply in place of the chosen one (the last assistant message)."""
        return [*self.messages[:-1], {"role": "assistant", "content": self.rejected or ""}]

    def prompt_messages(self) -> list[dict[str, str]]:
        """The conversation up to and including its last user turn: what a model answers at inference."""
        last_user = max((i for i, m in enumerate(self.messages) if m["role"] == "user"), default=-1)
        if last_user < 0:
            raise SampleError(self.id, "no_user_turn", "has no user turn to answer.")
        return self.messages[: last_user + 1]

    def reference_answer(self) -> str | None:
        """The assistant reply that follows the last user turn, if the data holds one."""
        after = self.messages[len(self.prompt_messages()) :]
        return after[0]["content"] if after and after[0]["role"] == "assistant" else None
