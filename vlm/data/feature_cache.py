"""Frozen-encoder outputs stored on disk, so later epochs (and later runs) skip the tower.

A frozen encoder's output is a pure function of (image bytes, encoder weights, feature
layer, preprocessing), so that is exactly what the key hashes: a changed image or a
different encoder never reads a stale entry. One safetensors file per image, written to a
temporary name and renamed into place; a file that fails to load or does not match the
expected shape is deleted and recomputed, never used.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import atomic_file
from ..encoders import VisionEncoder
from .images import load_images
from .sample import ImageRef, Sample, SampleError

if TYPE_CHECKING:  # the processor (vlm/processor.py) imports this package's modules
    from ..processor import VLMProcessor

logger = logging.getLogger(__name__)


def encoder_fingerprint(vision: VisionEncoder) -> str:
    """Hash of everything that determines the tower's output for a given image."""
    digest = hashlib.sha256()
    digest.update(repr((vision.library, vision.source, vision.feature_layer, vision.drop_prefix_tokens)).encode())
    digest.update(repr(sorted(vision.preprocessing_config().items())).encode())
    for name, tensor in sorted(vision.state_dict().items()):
        digest.update(name.encode())
        # reshape(-1): a 0-dim buffer (BatchNorm's num_batches_tracked) cannot be viewed as bytes as it is.
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


class FeatureCache:
    """features(image) -> [num_patches, hidden] tensor, read from `root` or None when absent."""

    def __init__(self, root: str | Path, fingerprint: str, shape: tuple[int, int]) -> None:
        self.root = Path(root) / fingerprint
        self.fingerprint = fingerprint
        self.shape = shape
        self.rebuilt = 0
        self._file_keys: dict[str, str] = {}  # a file is read and hashed once per process, not every step

    def key(self, image: ImageRef) -> str:
        if isinstance(image, str) and image in self._file_keys:
            return self._file_keys[image]
        digest = hashlib.sha256(self.fingerprint.encode())
        if not isinstance(image, (str, Image.Image)):  # bytes or a dataset cell: key by the decoded pixels
            image = load_images(Sample("key", [], [image]))[0]
        if isinstance(image, Image.Image):
            digest.update(repr((image.mode, image.size)).encode())
            digest.update(image.tobytes())
            return digest.hexdigest()
        digest.update(Path(image).read_bytes())
        self._file_keys[image] = digest.hexdigest()
        return self._file_keys[image]

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, image: ImageRef) -> torch.Tensor | None:
        path = self._path(self.key(image))
        if not path.is_file():
            return None
        try:
            features = load_file(path)["features"]
            if tuple(features.shape) != self.shape:
                raise ValueError(f"shape {tuple(features.shape)} != {self.shape}")
            return features
        except (SafetensorError, KeyError, ValueError, OSError) as err:
            logger.warning("Feature cache entry %s is corrupt (%s); recomputing it.", path, err)
            path.unlink(missing_ok=True)
            self.rebuilt += 1
            return None

    def put(self, image: ImageRef, features: torch.Tensor) -> None:
        path = self._path(self.key(image))
        with atomic_file(path) as tmp:
            save_file({"features": features.detach().cpu().contiguous()}, str(tmp))

    @torch.no_grad()
    def fill(
        self, samples: Iterable[Sample], processor: VLMProcessor, vision: VisionEncoder,
        batch_size: int = 32, rank: int = 0, world_size: int = 1,
    ) -> int:
        """Encode every image not yet cached (this rank's share of them); returns how many were encoded."""
        pending: list[ImageRef] = []
        seen: set[str] = set()
        for index, sample in enumerate(samples):
            for image in sample.images:
                ident = image if isinstance(image, str) else f"{sample.id}:{id(image)}"
                if ident in seen or (index % world_size) != rank:
                    continue
                seen.add(ident)
                if self.get(image) is None:
                    pending.append(image)
        device = next(vision.parameters()).device
        for start in range(0, len(pending), batch_size):
            chunk, decoded = [], []
            for image in pending[start : start + batch_size]:  # one at a time: a bad image costs only itself
                try:
                    decoded += load_images(Sample("cache", [], [image]), processor.max_image_pixels)
                    chunk.append(image)
                except SampleError:
                    continue  # the dataset reports bad images itself
            if not chunk:
                continue
            pixels = torch.stack([processor.image_transform(im) for im in decoded]).to(device)
            for image, features in zip(chunk, vision(pixels)):
                self.put(image, features)
        return len(pending)
