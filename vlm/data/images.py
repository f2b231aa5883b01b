"""Reading a sample's images: size checked before decoding, every failure a `SampleError` naming the sample."""

from __future__ import annotations

import contextlib
import io
import threading
from typing import Any, Iterator

import numpy as np
from PIL import Image

from ..config import DataConfig
from .sample import Sample, SampleError

DEFAULT_MAX_IMAGE_PIXELS = DataConfig.max_image_pixels


def load_images(sample: Sample, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> list[Image.Image]:
    """Decode every image of a sample as RGB; any image that cannot be used is a `SampleError` naming it.

    Decoding is third-party code on untrusted bytes, so every failure (not only the expected ones) becomes
    a skipped sample rather than a dead run. The declared size is checked before any pixel is decoded."""
    return [load_image(image, sample.id, max_pixels) for image in sample.images]


def load_image(image: Any, sample_id: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """One image of sample `sample_id` (a path, bytes or PIL image), decoded as `load_images` does."""
    return _read_image(image, max_pixels, sample_id, decode=True)


def probe_images(sample: Sample, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    """Read each image's header only (no pixel decoding): missing, unidentifiable and oversized images
    are found up front, which is how `data.strict` stops before step 1 rather than mid-run."""
    for image in sample.images:
        _read_image(image, max_pixels, sample.id, decode=False)


def _read_image(image: Any, max_pixels: int | None, sample_id: str, decode: bool) -> Image.Image | None:
    what = f"image file '{image}'" if isinstance(image, str) else f"image {_describe(image)}"
    try:
        return _open_checked(image, max_pixels, sample_id, what, decode)
    except SampleError:
        raise
    except FileNotFoundError:
        raise SampleError(sample_id, "missing_image", f"{what} does not exist.") from None
    except IsADirectoryError:
        raise SampleError(sample_id, "missing_image", f"{what} is a folder, not an image file.") from None
    except Image.DecompressionBombError as err:
        raise SampleError(sample_id, "image_too_large", f"{what} is too large to decode safely ({err}); "
                          "downscale it or raise data.max_image_pixels.") from None
    except MemoryError:
        raise SampleError(sample_id, "image_too_large", f"{what} does not fit in memory when decoded.") from None
    except Exception as err:  # noqa: BLE001 - see load_images
        raise SampleError(
            sample_id, "corrupt_image", f"{what} cannot be decoded ({type(err).__name__}: {err})."
        ) from None


def _open_checked(
    image: Any, max_pixels: int | None, sample_id: str, what: str, decode: bool,
) -> Image.Image | None:
    """Open lazily (header only), refuse a declared size over `max_pixels`, then (if `decode`) decode to RGB."""
    if isinstance(image, Image.Image):
        _check_pixels(image.size, max_pixels, sample_id, what)
        return _to_rgb(image) if decode else None
    if hasattr(image, "encoded"):  # a dataset cell (DatasetImage): its bytes or path, not yet decoded
        image = image.encoded()
    with _pillow_limit(max_pixels), Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
        _check_pixels(opened.size, max_pixels, sample_id, what)
        return _to_rgb(opened) if decode else None


def _check_pixels(size: tuple[int, int], max_pixels: int | None, sample_id: str, what: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise SampleError(sample_id, "corrupt_image", f"{what} declares an empty size {width}x{height}.")
    if max_pixels is not None and width * height > max_pixels:
        raise SampleError(
            sample_id, "image_too_large",
            f"{what} declares {width}x{height} = {width * height:,} pixels, over data.max_image_pixels="
            f"{max_pixels:,}; downscale it or raise data.max_image_pixels.",
        )


_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _pillow_limit(max_pixels: int | None) -> Iterator[None]:
    """Pillow refuses images over twice its own global limit. A configured limit above Pillow's (or none)
    is ours to enforce: lift Pillow's around this one decode, under a lock, and restore it after."""
    if max_pixels is not None and (Image.MAX_IMAGE_PIXELS is None or max_pixels <= Image.MAX_IMAGE_PIXELS):
        yield
        return
    with _LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB for the encoder. 16/32-bit integer images are scaled to 8 bits first: Pillow's own
    conversion clips them, which turns most 16-bit photos white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.int64)
        image = Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8))  # 2-D uint8: mode L
    return image.convert("RGB")


def _describe(image: object) -> str:
    return f"({len(image)} bytes)" if isinstance(image, bytes) else repr(image)
