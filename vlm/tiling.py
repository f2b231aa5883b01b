"""Any-resolution tiling (`data.tiling`): one image -> a global thumbnail plus a grid of tiles.

Each view (thumbnail, tiles) is an image at the tower's input size, so any frozen tower reads it
and every fusion sees ordinary views. What is decided here, and only here:

- the grid, from the image's (width, height) alone (`select_grid`): among every rows x cols with
  at most `max_tiles` tiles, the one that keeps the most of the image's pixels when it is scaled to
  fit, then the one that wastes the least canvas (LLaVA-NeXT's `select_best_resolution`);
- the views (`image_views`): the thumbnail first (the tower's own transform of the whole image,
  exactly what runs without tiling), then the tiles in row-major order, cut from the image resized
  to the grid's resolution; a 1x1 grid is the thumbnail alone;
- the layout in the text (`image_layout`): the thumbnail's positions, then for each row of tiles a
  separator (the tokenizer's "\n", plain text the LM already reads as a line break) and that row's
  positions. Strategies that occupy no positions keep one marker per image;
- the model-side regrouping of views into images (`views_per_image`, `group_views`) and the count
  check (`check_image_positions`).

Token counts are functions of the grid, so they are known from the image header before any pixel
is decoded and before any forward pass.
"""

from __future__ import annotations

from typing import Callable

import torch
from PIL import Image

Grid = tuple[int, int]
"""(rows, cols) of tiles."""


def candidate_grids(max_tiles: int) -> list[Grid]:
    """Every (rows, cols) with 1 <= rows * cols <= max_tiles, rows-major order."""
    return [(r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1) if r * c <= max_tiles]


def select_grid(width: int, height: int, max_tiles: int, tile_size: tuple[int, int]) -> Grid:
    """The grid for a width x height image with tiles of tile_size (H, W): the one that keeps the most
    of the image's pixels when the image is scaled to fit it, ties to the least wasted canvas."""
    if max_tiles <= 1:
        return (1, 1)
    tile_h, tile_w = tile_size
    best, best_key = (1, 1), None
    for rows, cols in candidate_grids(max_tiles):
        canvas_w, canvas_h = cols * tile_w, rows * tile_h
        scale = min(canvas_w / width, canvas_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        key = (kept, -(canvas_w * canvas_h - kept))
        if best_key is None or key > best_key:
            best, best_key = (rows, cols), key
    return best


def num_views(grid: Grid) -> int:
    """Views the tower reads for one image: the thumbnail alone for 1x1, else thumbnail + tiles."""
    tiles = grid[0] * grid[1]
    return 1 if tiles == 1 else tiles + 1


def image_views(
    image: Image.Image, grid: Grid, transform: Callable[[Image.Image], torch.Tensor], tile_size: tuple[int, int]
) -> torch.Tensor:
    """[num_views(grid), 3, H, W]: the thumbnail (`transform` of the whole image), then the tiles in
    row-major order, each `transform` of one tile_size crop of the image resized to the grid."""
    views = [transform(image)]
    rows, cols = grid
    if rows * cols > 1:
        tile_h, tile_w = tile_size
        canvas = image.convert("RGB").resize((cols * tile_w, rows * tile_h), Image.Resampling.BICUBIC)
        for r in range(rows):
            for c in range(cols):
                views.append(transform(canvas.crop((c * tile_w, r * tile_h, (c + 1) * tile_w, (r + 1) * tile_h))))
    return torch.stack(views)


def image_layout(grid: Grid, tokens_per_image: int, image_token_id: int, separator_ids: list[int]) -> list[int]:
    """The token ids one image becomes in the text: thumbnail positions, then per row of tiles the
    separator and the row's positions; one marker for strategies that occupy no positions."""
    if tokens_per_image == 0:
        return [image_token_id]
    rows, cols = grid
    out = [image_token_id] * tokens_per_image
    if rows * cols > 1:
        for _ in range(rows):
            out += [*separator_ids, *[image_token_id] * (cols * tokens_per_image)]
    return out


def image_positions(grid: Grid, tokens_per_image: int) -> int:
    """`<image>` positions one image occupies: every view's tokens (one marker when tokens_per_image is 0)."""
    return num_views(grid) * tokens_per_image if tokens_per_image else 1


def views_per_image(image_grids: torch.Tensor) -> torch.Tensor:
    """image_grids [num_images, 2] (rows, cols) -> views per image [num_images]."""
    tiles = image_grids[:, 0] * image_grids[:, 1]
    return torch.where(tiles > 1, tiles + 1, 1)


def group_views(features: torch.Tensor, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-view tokens [total_views, tokens, dim] (images in order, each image's views together) and
    views per image [num_images] -> per-image tokens [num_images, max_views * tokens, dim] (zeros past an
    image's own views) and the mask [num_images, max_views * tokens] of its real ones: for strategies
    that read an image's tokens rather than fill positions with them (cross_attention)."""
    views = views.to(features.device)
    n, most = views.shape[0], int(views.max())
    _, tokens, dim = features.shape
    slot = torch.arange(most, device=features.device)
    valid = slot < views.unsqueeze(1)  # [num_images, max_views]
    index = (views.cumsum(0) - views).unsqueeze(1) + slot
    grouped = torch.where(valid.view(n, most, 1, 1), features[index.clamp(max=features.shape[0] - 1)], 0.0)
    return grouped.reshape(n, most * tokens, dim), valid.repeat_interleave(tokens, dim=1)


def mean_over_views(pooled: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """Per-view vectors [total_views, dim] -> each image's mean over its views [num_images, dim]."""
    views = views.to(pooled.device)
    image = torch.repeat_interleave(torch.arange(views.shape[0], device=pooled.device), views)
    sums = pooled.new_zeros(views.shape[0], pooled.shape[1]).index_add_(0, image, pooled)
    return sums / views.unsqueeze(1).to(pooled.dtype)


def check_image_positions(
    image_mask: torch.Tensor, image_grids: torch.Tensor, tokens_per_image: int, sample_ids: list[str] | None = None
) -> None:
    """Every row's image positions must be exactly what its images' grids need; otherwise a one-line
    error naming the first row (its sample id when known) where the text and the images part ways."""
    need = [image_positions((int(r), int(c)), tokens_per_image) for r, c in image_grids.tolist()]
    have = image_mask.sum(1).tolist()
    if sum(have) == sum(need) and _rows_fit(have, need) is None:
        return
    row = _rows_fit(have, need)
    row = len(have) - 1 if row is None else row
    one_per_row = sample_ids is not None and len(sample_ids) == len(have)  # not so in packed rows
    who = f"sample '{sample_ids[row]}'" if one_per_row else f"batch row {row}"
    raise ValueError(
        f"{who} has {have[row]} image positions, which its images' tiles do not fill (the batch's images need "
        f"{sum(need)} positions in all, its text has {sum(have)}); the processor and the model disagree on "
        "data.tiling or tokens per image: build the processor from the same model (vlm.factory.load / processor_for)."
    )


def _rows_fit(have: list[int], need: list[int]) -> int | None:
    """The first row whose positions are not a whole run of the next images' needs (images in row order)."""
    image = 0
    for row, count in enumerate(have):
        while count > 0 and image < len(need) and need[image] <= count:
            count -= need[image]
            image += 1
        if count:
            return row
    return None
