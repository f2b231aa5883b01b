"""A map-style dataset over `Sample`s that checks every sample up front and skips bad ones."""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from .dropout import check_dropped_image, check_image_corruption, corrupt_images, drop_images, dropout_generator
from ..config import DataConfig, DataFile
from .mixture import read_files
from .feature_cache import FeatureCache
from .images import probe_images
from ..loss import IGNORE_INDEX
from .sample import DataError, Sample, SampleError

if TYPE_CHECKING:  # the processor (vlm/processor.py) imports this package's modules
    from ..processor import VLMProcessor

logger = logging.getLogger(__name__)

UNREADABLE = ("report", "replace", "stand_in")


class ConversationDataset(Dataset):
    """Bad samples are dropped and counted at construction (cheap checks) or reported as
    `{"skipped": ...}` items at load time (image decoding), so a run never dies mid-way
    on one bad record. With `strict=True` the first bad sample raises instead, before step 1:
    every image's header is read up front then (decoding errors past the header still surface
    when the image is loaded).

    image_dropout: each image is dropped (with its `<image>` tag) with this probability, drawn from
    (seed, epoch, index) so a resumed run sees the same draws; call `set_epoch` at each epoch.
    dropped_image: `remove` (image and tag) or `blank` (a grey image in its place; vlm/data/dropout.py).
    image_corruption: each kept image is corrupted (random test-time corruption) with this probability,
    from the same draws; the pixels change, so it cannot be served from a feature cache.
    unreadable: what an index whose sample fails to load gives. `report`: the `{"skipped": ...}` item alone
    (predict, checks). `replace` (training): the next sample that loads, carrying the failed one's report
    under `"replaced"`, so a batch is never empty and every rank runs the same forwards. `stand_in`
    (evaluation): the same, with no supervised token, so no sample's loss counts twice.
    """

    def __init__(
        self, samples: list[Sample], processor: VLMProcessor, strict: bool = False,
        errors: list[SampleError] = (), for_generation: bool = False, feature_cache: FeatureCache | None = None,
        image_dropout: float = 0.0, seed: int = 0, dropped_image: str = "remove", image_corruption: float = 0.0,
        unreadable: str = "report",
    ) -> None:
        if unreadable not in UNREADABLE:
            raise ValueError(f"unreadable={unreadable!r}: choose one of {UNREADABLE}.")
        self.unreadable = unreadable
        if not 0.0 <= image_dropout <= 1.0:
            raise ValueError(f"train.image_dropout / --image-drop must be in [0, 1], got {image_dropout}.")
        self.image_corruption = check_image_corruption(image_corruption, feature_cache is not None)
        self.image_dropout, self.seed, self.epoch = image_dropout, seed, 0
        self.dropped_image = check_dropped_image(dropped_image)
        self.processor = processor
        self.feature_cache = feature_cache
        self.strict = strict
        self.for_generation = for_generation
        self.problems: Counter[str] = Counter()
        for err in errors:
            self._report(err)
        self.samples = []
        for sample in samples:
            try:
                processor.check(sample, for_generation)
                if strict and feature_cache is None:
                    probe_images(sample, processor.max_image_pixels)
                self.samples.append(sample)
            except SampleError as err:
                self._report(err)
        self.coerced = [s.id for s in self.samples if s.coerced]
        """Kept samples where a number stood in for text and was used as text."""
        if self.coerced:
            example = next(s for s in self.samples if s.coerced)
            logger.warning(
                "%d sample(s) have a number where text belongs, used as text (e.g. sample '%s': %s); ids: %s",
                len(self.coerced), example.id, example.coerced[0], ", ".join(self.coerced[:20]),
            )

    @classmethod
    def from_files(
        cls, files: list[str | DataFile], processor: VLMProcessor, image_root: str | None = None, strict: bool = False,
        for_generation: bool = False, feature_cache: FeatureCache | None = None,
        image_dropout: float = 0.0, seed: int = 0, data: DataConfig | None = None, dropped_image: str = "remove",
        image_corruption: float = 0.0, unreadable: str = "report",
    ) -> "ConversationDataset":
        """`files` may carry weights (a weighted mixture); `data` supplies the table prompt templates."""
        samples, errors = read_files(files, image_root, data, seed)
        return cls(samples, processor, strict, errors, for_generation, feature_cache, image_dropout, seed,
                   dropped_image, image_corruption, unreadable)

    def set_epoch(self, epoch: int) -> None:
        """Image dropout draws depend on the epoch: call before each pass over the data."""
        self.epoch = epoch

    def _report(self, err: SampleError) -> None:
        if self.strict:
            raise err
        self.problems[err.category] += 1
        logger.warning("Skipping %s", err)

    def _with_cached_features(self, sample: Sample) -> dict[str, Any]:
        item = self.processor(sample, for_generation=self.for_generation, with_pixels=False)
        features = []
        for image in sample.images:
            cached = self.feature_cache.get(image)
            if cached is None:
                raise SampleError(sample.id, "not_cached", "has an image missing from the feature cache.")
            features.append(cached)
        item["image_features"] = torch.stack(features) if features else None
        return item

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.load_or_report(index)
        if "skipped" not in item or self.unreadable == "report":
            return item
        return {**self._next_readable(index), "replaced": [item]}

    def load_or_report(self, index: int) -> dict[str, Any]:
        """The processed sample at `index`, or the `{"skipped": id, "category", "detail"}` report of why it
        failed to load (raised instead with `strict`)."""
        try:
            return self._load(index)
        except SampleError as err:
            if self.strict:
                raise
            return {"skipped": err.sample_id, "category": err.category, "detail": err.detail}

    def _next_readable(self, index: int) -> dict[str, Any]:
        """The first sample after `index` (wrapping round) that loads; the ones passed over are reported when
        their own index is read."""
        for offset in range(1, len(self)):
            try:
                item = self._load((index + offset) % len(self))
            except SampleError:
                continue
            if self.unreadable == "stand_in":
                for part in (item, *([item["rejected"]] if "rejected" in item else [])):  # a pair: both sides
                    part["labels"] = torch.full_like(part["labels"], IGNORE_INDEX)
            return item
        raise DataError(f"None of the {len(self)} samples could be loaded; run `vlm data check` on them.")

    def _load(self, index: int) -> dict[str, Any]:
        """The processed sample at `index` (dropout and corruption drawn for it); raises SampleError."""
        sample = self.samples[index]
        if self.image_dropout > 0 or self.image_corruption > 0:  # one generator for both, as before for dropout
            generator = dropout_generator(self.seed, self.epoch, index)
        if self.image_dropout > 0:
            sample = drop_images(sample, self.image_dropout, generator, self.processor.image_token, self.dropped_image)
        if self.image_corruption > 0:
            sample = corrupt_images(sample, self.image_corruption, generator, self.processor.max_image_pixels)
        if self.feature_cache is None:
            return self.processor(sample, for_generation=self.for_generation)
        return self._with_cached_features(sample)
