"""Answer a prompt about some images in one call: a model and its processor, held together.

    from vlm import Pipeline
    pipe = Pipeline.from_pretrained("runs/finetune/final")
    print(pipe.generate(images=[Image.open("cat.jpg")], prompt="What is this?"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from .data.collator import Collator
from .data.content import with_image_tags
from .data.sample import Sample
from .factory import load, processor_for
from .model import VLM
from .processor import VLMProcessor


class Pipeline:
    """`model` (in eval mode) and the `processor` that feeds it; without one, the model's own is built."""

    def __init__(self, model: VLM, processor: VLMProcessor | None = None) -> None:
        self.model = model.eval()
        self.processor = processor or processor_for(model)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Pipeline":
        """A saved VLM folder, ready to answer."""
        return cls(*load(directory))

    def generate(
        self, images: list[Image.Image] | None = None, prompt: str = "", max_new_tokens: int = 64, **kwargs: Any
    ) -> str:
        """Answer one prompt about the given images; images without a tag in the prompt go first."""
        return self.generate_batch([(images or [], prompt)], max_new_tokens, **kwargs)[0]

    def generate_batch(
        self, requests: list[tuple[list[Image.Image], str]], max_new_tokens: int = 64, **kwargs: Any
    ) -> list[str]:
        """Answer several (images, prompt) pairs in one left-padded batch, as `vlm predict` does."""
        items = [self.processor(self.prompt_sample(images, prompt, f"prompt-{i}"), for_generation=True)
                 for i, (images, prompt) in enumerate(requests)]
        batch = Collator(self.processor.tokenizer.pad_token_id, "left")(items)
        return self.processor.decode(self.model.generate(**batch.generation_inputs(), max_new_tokens=max_new_tokens,
                                                         **kwargs))

    def prompt_sample(self, images: list[Image.Image], prompt: str, sample_id: str = "prompt") -> Sample:
        """A one-turn `Sample`; an image the prompt has no `<image>` tag for gets one on its own line in front."""
        images = list(images)
        text = with_image_tags(prompt, len(images), self.processor.image_token)
        return Sample(id=sample_id, messages=[{"role": "user", "content": text}], images=images)
