"""Sample -> model inputs: chat template, supervised-token mask, image-token expansion, pixels.

Like transformers' `LlavaProcessor`, it lives beside the model, not inside it: the model takes tensors,
this owns the text side (tokenizer, chat template, `<image>` expansion) and the tower's image transform.
Every setting is fixed at construction (`vlm.factory` builds both from one config); a saved folder
loads it alone, without any weights (`VLMProcessor.from_pretrained`).

The label mask comes from the chat template itself: each assistant turn's span is located
by rendering the conversation up to that turn (with and without the reply) and mapping those
character offsets to tokens through the tokenizer's offset mapping. Nothing here knows what
a particular template's role markers look like.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from .data.validation import check_sample
from .data.images import DEFAULT_MAX_IMAGE_PIXELS, load_images
from .data.sample import Sample, SampleError
from .encoders import ImageTransform, saved_image_transform
from .folder import PROCESSOR_CONFIG, load_saved_tokenizer, read_saved_config, saved_tiling
from .loss import IGNORE_INDEX
from .tiling import Grid, image_layout, image_views, select_grid


class VLMProcessor:
    """Turns a `Sample` into `input_ids`, `labels` and `pixel_values` for one model."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_transform: ImageTransform,
        image_token: str,
        tokens_per_image: int,
        max_length: int | None = None,
        truncate_text: bool = False,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        max_tiles: int = 0,
        tile_size: tuple[int, int] | None = None,
        image_processor_config: dict[str, Any] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.tokens_per_image = tokens_per_image
        self.max_length = max_length
        self.truncate_text = truncate_text
        """Over-long samples: cut the text after the last image token (True) or reject them (False)."""
        self.max_image_pixels = max_image_pixels
        """Images declaring more pixels are skipped before decoding (`data.max_image_pixels`; None: no limit)."""
        self.max_tiles = max_tiles if max_tiles > 1 else 0
        """`data.tiling.max_tiles` (0: no tiling): each image becomes a thumbnail plus tiles (vlm/tiling.py)."""
        self.tile_size = tile_size
        """(H, W) of one tile: the tower's input size."""
        self.image_processor_config = image_processor_config
        """The tower's preprocessing as preprocessor_config.json states it (`VisionEncoder.image_processor_config`)."""
        self.separator_ids: list[int] = []
        """Token ids before each row of tiles: the tokenizer's own "\n"."""
        if self.max_tiles:
            self.separator_ids = tokenizer.encode("\n", add_special_tokens=False)
            if tile_size is None or not self.separator_ids:
                raise ValueError("data.tiling needs the tower's input size and a tokenizer that encodes '\\n'.")

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, max_length: int | None = None, truncate_text: bool = False,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, max_tiles: int | None = None,
    ) -> "VLMProcessor":
        """The processor of a saved VLM folder (tokenizer, image transform, image token, tokens_per_image and
        tiling), reading no weights: what data tools (`vlm data check`, the feature cache) need.
        max_tiles: tile otherwise than the folder (None: as the folder says)."""
        directory = Path(directory)
        meta, config = read_saved_config(directory)
        transform = saved_image_transform(directory, meta["vision_library"], config.trust_remote_code)
        tiling = saved_tiling(directory, meta)
        image_config = directory / "preprocessor_config.json"
        return cls(
            load_saved_tokenizer(directory, config), transform, config.image_token, meta["tokens_per_image"],
            max_length, truncate_text, max_image_pixels,
            int(tiling.get("max_tiles", 0)) if max_tiles is None else max_tiles, _tile_size(tiling, transform),
            json.loads(image_config.read_text()) if image_config.is_file() else None,
        )

    def save_pretrained(self, directory: str | Path) -> None:
        """The processor's files in a VLM folder: the tokenizer with its chat template, preprocessor_config.json
        (the tower's preprocessing, for any tool reading the folder) and, with tiling, processor_config.json.
        The folder is complete with the model's files (`vlm.factory.save` writes both, atomically)."""
        directory = Path(directory)
        self.tokenizer.save_pretrained(directory)
        if self.image_processor_config is not None:
            (directory / "preprocessor_config.json").write_text(json.dumps(self.image_processor_config, indent=2))
        if self.max_tiles:
            tiling = {"max_tiles": self.max_tiles, "tile_size": list(self.tile_size)}
            (directory / PROCESSOR_CONFIG).write_text(json.dumps({"tiling": tiling}, indent=2))

    def __call__(self, sample: Sample, for_generation: bool = False, with_pixels: bool = True) -> dict[str, Any]:
        """Returns input_ids [seq], labels [seq], pixel_values [num_images, 3, H, W] or None, id, and
        image_seen [seq]: which of the sample's images each position shows or follows (the most recent one
        at or before it, from 0; -1 before the first), what the collator turns into `ImagePositions`.

        for_generation: encode only the prompt (up to the last user turn) plus the
        generation prompt, for `predict` / `generate`.
        with_pixels=False skips image decoding (the caller supplies cached features).
        With tiling (`max_tiles`), pixel_values holds every image's views [total_views, 3, H, W] and
        image_grids [num_images, 2] each image's (rows, cols) (vlm/tiling.py).
        A preference pair (`Sample.rejected`) also gets `rejected`: the rejected conversation's input_ids /
        labels / image_seen, reading the same images (the collator puts it in a row of its own).
        """
        if self.max_tiles and not with_pixels:
            raise ValueError("data.tiling needs each image's size; it cannot run on cached features.")
        self.check(sample, for_generation)
        messages = sample.prompt_messages() if for_generation else sample.messages
        num_images = sum(m["content"].count(self.image_token) for m in messages)
        # With tiling an image's token count depends on its size, so its header is read (and, here, its
        # pixels decoded) before the text is laid out; without, over-long text is refused before decoding.
        images = self.load_images(sample)[:num_images] if self.max_tiles else None
        grids = None if images is None else [self.grid_for(*image.size) for image in images]
        item: dict[str, Any] = {"id": sample.id, **self._text(sample.id, messages, for_generation, grids)}
        if sample.rejected is not None and not for_generation:  # a preference pair: the same images, once
            item["rejected"] = self._text(sample.id, sample.rejected_messages(), False, grids)
        if grids is None:
            images = self.load_images(sample)[:num_images] if with_pixels else []
            item["pixel_values"] = torch.stack([self.image_transform(im) for im in images]) if images else None
            return item
        views = [image_views(im, grid, self.image_transform, self.tile_size) for im, grid in zip(images, grids)]
        item["pixel_values"] = torch.cat(views) if views else None
        item["image_grids"] = torch.tensor(grids, dtype=torch.long) if grids else None
        return item

    def _text(self, sample_id: str, messages: list[dict[str, str]], for_generation: bool,
              grids: list[Grid] | None) -> dict[str, torch.Tensor]:
        """input_ids / labels / image_seen [seq] of one conversation, its images laid out (`grids` with tiling)."""
        ids, labels = self.tokenize(messages, add_generation_prompt=for_generation)
        ids, labels, seen = self._expand_images(ids, labels, grids)
        if self.max_length is not None and not for_generation and len(ids) > self.max_length:
            ids, labels = self._fit_length(sample_id, ids, labels)
            seen = seen[: len(ids)]  # truncation never cuts an image (`_fit_length`)
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long),
                "image_seen": torch.tensor(seen, dtype=torch.long)}

    def decode(self, new_tokens: torch.Tensor) -> list[str]:
        """`VLM.generate`'s new tokens [batch, new] -> each row's answer, special tokens dropped and stripped
        (what `vlm predict`, `vlm serve` and `Pipeline` return)."""
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def grid_for(self, width: int, height: int) -> Grid:
        """The tile grid (rows, cols) of a width x height image; (1, 1) (the thumbnail alone) without tiling."""
        return select_grid(width, height, self.max_tiles, self.tile_size) if self.max_tiles else (1, 1)

    def image_tokens(self, width: int, height: int) -> int:
        """Text positions a width x height image takes (its `<image>` positions and row separators), from its
        size alone: the header's size is enough, no pixel is decoded."""
        return len(image_layout(self.grid_for(width, height), self.tokens_per_image, self.image_token_id,
                                self.separator_ids))

    def _fit_length(self, sample_id: str, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """Truncate the text after the last image token (data.truncate_text), never through image tokens."""
        too_long = f"is {len(ids)} tokens with image tokens counted, over data.max_length={self.max_length}"
        if not self.truncate_text:
            raise SampleError(
                sample_id, "too_long",
                f"{too_long}; raise data.max_length, shorten the sample or set data.truncate_text=true.",
            )
        images_end = max((i + 1 for i, t in enumerate(ids) if t == self.image_token_id), default=0)
        if images_end > self.max_length:
            raise SampleError(
                sample_id, "too_long",
                f"{too_long} and its image tokens alone reach position {images_end}, so truncating the text "
                "cannot fit it; raise data.max_length or use fewer images.",
            )
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise SampleError(
                sample_id, "too_long", f"{too_long} and no answer token is left after truncation; raise data.max_length.",
            )
        return ids, labels

    def check(self, sample: Sample, for_generation: bool = False) -> None:
        """Training needs an answer to learn from; generation (predict) does not."""
        check_sample(sample, self.image_token, needs_answer=not for_generation)

    def load_images(self, sample: Sample) -> list[Image.Image]:
        return load_images(sample, self.max_image_pixels)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def tokenize(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Token ids of the rendered conversation, and labels that keep only assistant turns."""
        text = self.render(messages, add_generation_prompt)
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:k], add_generation_prompt=True)
            through = self.render(messages[: k + 1])
            if not (text.startswith(before) and text.startswith(through)):
                raise ValueError(
                    "The chat template renders a conversation differently from its prefixes, so assistant "
                    "turns cannot be located; use a template whose output grows turn by turn."
                )
            # Trailing newlines after the end-of-turn marker are layout, not part of the reply.
            spans.append((len(before), max(len(through.rstrip()), len(before) + 1)))
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        labels = [
            token if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
            for token, (start, _) in zip(ids, encoded["offset_mapping"])
        ]
        return ids, labels

    def _expand_images(
        self, ids: list[int], labels: list[int], grids: list[Grid] | None = None,
    ) -> tuple[list[int], list[int], list[int]]:
        """Each image token becomes `tokens_per_image` copies; the fusion fills them in the model. With
        tiling (`grids`, one per image in order), the k-th becomes `image_layout` of the k-th grid.
        Also returns, per position, the index of the most recent image at or before it (-1: none yet).

        Strategies that occupy no positions (tokens_per_image == 0) keep one image token as a
        plain marker, so they can still tell where in the text each image appears.
        """
        copies = self.tokens_per_image or 1
        out_ids, out_labels, seen = [], [], []
        images = iter(grids or [])
        current = -1
        for token, label in zip(ids, labels):
            if token == self.image_token_id:
                expanded = (
                    [token] * copies if grids is None
                    else image_layout(next(images), self.tokens_per_image, token, self.separator_ids)
                )
                current += 1
                out_ids += expanded
                out_labels += [IGNORE_INDEX] * len(expanded)
                seen += [current] * len(expanded)
            else:
                out_ids.append(token)
                out_labels.append(label)
                seen.append(current)
        return out_ids, out_labels, seen



def _tile_size(tiling: dict[str, Any], transform: ImageTransform) -> tuple[int, int]:
    """The tower's input size (H, W): recorded with a folder's tiling, else what its transform outputs
    (a folder saved without tiling, tiled from here on by `data.tiling`)."""
    size = tiling.get("tile_size") or transform(Image.new("RGB", (8, 8))).shape[-2:]
    return int(size[0]), int(size[1])
