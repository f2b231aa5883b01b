"""Tiling's pure parts: grid choice from the size alone, the layout in the text, views, regrouping, the count check."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.config import ConfigError, load_config
from vlm.tiling import (
    candidate_grids, check_image_positions, group_views, image_layout, image_positions, image_views, mean_over_views,
    num_views, select_grid, views_per_image,
)

TILE = (64, 64)


@pytest.mark.parametrize("size, max_tiles, grid", [
    ((256, 256), 4, (2, 2)),   # square and large: the full 2x2 grid, nothing wasted
    ((256, 64), 4, (1, 4)),    # wide 4:1: one row of four
    ((64, 200), 4, (4, 1)),    # tall: the column that keeps every pixel beats the 3x1 that shrinks it
    ((64, 200), 3, (3, 1)),    # ... unless it is not allowed
    ((128, 64), 6, (1, 2)),    # 2:1 at exactly two tiles: no larger grid keeps more, all waste more
    ((300, 100), 6, (1, 3)),   # 3:1 on six tiles: 1x3 keeps as much as 2x6 would and wastes the least
    ((40, 30), 9, (1, 1)),     # smaller than a tile: the thumbnail alone
    ((1000, 1000), 1, (1, 1)), # max_tiles 1 is no tiling
    ((1000, 1000), 0, (1, 1)),
])
def test_grid_fits_aspect_ratio_and_resolution(size, max_tiles, grid):
    assert select_grid(*size, max_tiles, TILE) == grid


def test_candidates_are_every_grid_within_the_budget():
    assert candidate_grids(3) == [(1, 1), (1, 2), (1, 3), (2, 1), (3, 1)]
    assert all(r * c <= 8 for r, c in candidate_grids(8)) and (2, 4) in candidate_grids(8)


def test_layout_thumbnail_then_a_separator_before_each_row_of_tiles():
    sep, img = [10, 11], 7
    assert image_layout((1, 1), 3, img, sep) == [img] * 3
    assert image_layout((2, 2), 1, img, sep) == [img, 10, 11, img, img, 10, 11, img, img]
    assert image_layout((2, 3), 0, img, sep) == [img]  # strategies without positions: one marker
    for grid in [(1, 1), (1, 3), (2, 2), (3, 1)]:
        assert image_layout(grid, 4, img, sep).count(img) == image_positions(grid, 4) == 4 * num_views(grid)


def test_views_are_thumbnail_then_tiles_in_row_major_order():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 128, 3), dtype=np.uint8))  # 128 wide, 64 high
    to_tensor = lambda im: torch.from_numpy(np.asarray(im.resize((32, 32)), dtype=np.float32)).permute(2, 0, 1)  # noqa: E731
    views = image_views(image, (1, 2), to_tensor, (32, 32))
    assert views.shape == (3, 3, 32, 32)
    assert torch.equal(views[0], to_tensor(image))
    canvas = image.resize((64, 32), Image.Resampling.BICUBIC)
    assert torch.equal(views[1], to_tensor(canvas.crop((0, 0, 32, 32))))
    assert torch.equal(views[2], to_tensor(canvas.crop((32, 0, 64, 32))))
    assert image_views(image, (1, 1), to_tensor, (32, 32)).shape[0] == 1


def test_views_regroup_into_images_with_a_mask_of_the_real_ones():
    grids = torch.tensor([[2, 2], [1, 1], [1, 2]])
    views = views_per_image(grids)
    assert views.tolist() == [5, 1, 3]
    features = torch.arange(9 * 2 * 1, dtype=torch.float32).view(9, 2, 1)  # 9 views of 2 tokens
    grouped, mask = group_views(features, views)
    assert grouped.shape == (3, 10, 1) and mask.sum(1).tolist() == [10, 2, 6]
    assert torch.equal(grouped[1, :2], features[5]) and not grouped[1, 2:].any()
    assert torch.equal(grouped[2, :6].view(3, 2, 1), features[6:])
    pooled = mean_over_views(features[:, 0], views)
    assert torch.allclose(pooled[:, 0], torch.tensor([4.0, 10.0, 14.0]))


def test_a_count_mismatch_names_the_sample():
    grids = torch.tensor([[1, 1], [1, 2]])  # 1 and 3 views: 2 and 6 positions at 2 tokens per view
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, :2] = True
    mask[1, :6] = True
    check_image_positions(mask, grids, 2, ["a", "b"])
    mask[1, 5] = False
    with pytest.raises(ValueError, match=r"sample 'b' has 5 image positions"):
        check_image_positions(mask, grids, 2, ["a", "b"])
    with pytest.raises(ValueError, match=r"batch row 1 has 5"):
        check_image_positions(mask, grids, 2)


def test_config_key_and_its_checks():
    assert load_config(None, ["data.tiling.max_tiles=4"]).data.tiling.max_tiles == 4
    assert load_config(None).data.tiling.max_tiles == 0
    with pytest.raises(ConfigError, match="data.tiling.max_tiles"):
        load_config(None, ["data.tiling.max_tiles=-1"])
    with pytest.raises(ConfigError, match="data.cache_features"):
        load_config(None, ["data.tiling.max_tiles=4", "data.cache_features=true"])
