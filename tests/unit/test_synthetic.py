"""The synthetic dataset must show what its text says: otherwise no VLM can reach 90%."""

from __future__ import annotations

import json
import random
from collections import deque

import numpy as np
import pytest
from PIL import Image

from vlm.embedded.synthetic import (
    COLOURS,
    POSITIONS,
    QUESTION_TYPES,
    SHAPES,
    SIZES,
    Scene,
    caption,
    layout,
    make_synthetic_dataset,
    questions,
    random_scene,
    render_scene,
    text_corpus,
)


def _object_mask(image) -> np.ndarray:
    """Object pixels: the background is grey, every palette colour is saturated."""
    a = np.asarray(image).astype(int)
    return (a.max(-1) - a.min(-1)) > 60


def _components(mask: np.ndarray) -> int:
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        queue = deque([start])
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return count


def _read(path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB").copy()


def _nearest_colour(rgb: np.ndarray) -> str:
    return min(COLOURS, key=lambda c: float(np.sum((np.array(COLOURS[c]) - rgb) ** 2)))


@pytest.mark.parametrize("colour", list(COLOURS))
@pytest.mark.parametrize("shape", SHAPES)
def test_object_has_requested_colour_at_its_location(colour: str, shape: str) -> None:
    scene = Scene(colour, shape, "small", 1, "top")
    image = np.asarray(render_scene(scene, 64, random.Random(3)))
    ((cx, cy, _),) = layout(scene, 64, random.Random(3))  # render_scene places objects first
    centre = image[int(cy), int(cx)]
    assert _nearest_colour(centre) == colour
    assert np.abs(centre.astype(int) - COLOURS[colour]).max() <= 12
    assert (image[0, 0] == image[0, 0, 0]).all(), "background is a plain grey"


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("size", SIZES)
def test_single_object_lies_in_its_named_region(position: str, size: str) -> None:
    for seed in range(5):
        scene = Scene("blue", "triangle", size, 1, position)
        mask = _object_mask(render_scene(scene, 64, random.Random(seed)))
        ys, xs = np.nonzero(mask)
        cx, cy = xs.mean() / 64, ys.mean() / 64
        expected = {"left": cx < 0.33, "right": cx > 0.67, "top": cy < 0.33, "bottom": cy > 0.67}
        assert expected[position], (position, cx, cy)
        assert sum(expected.values()) == 1, "position must be unambiguous"
        assert mask[0].sum() == mask[-1].sum() == mask[:, 0].sum() == mask[:, -1].sum() == 0, "object clipped"


def test_count_size_and_colour_are_visible_in_random_scenes() -> None:
    rng = random.Random(0)
    areas = {"small": [], "large": []}
    for _ in range(150):
        scene = random_scene(rng)
        image = render_scene(scene, 64, rng)
        mask = _object_mask(image)
        assert _components(mask) == scene.count
        areas[scene.size].append(mask.sum() / scene.count)
        mean_rgb = np.asarray(image)[mask].mean(0)
        assert _nearest_colour(mean_rgb) == scene.colour
    assert max(areas["small"]) * 1.5 < min(areas["large"]), "small and large must not overlap in area"


def test_render_scales_with_image_size() -> None:
    image = render_scene(Scene("red", "circle", "large", 1, "left"), 96, random.Random(0))
    assert image.size == (96, 96)
    assert _components(_object_mask(image)) == 1


def test_wide_scenes_use_the_whole_width_and_keep_their_regions() -> None:
    """aspect=2 (the aspect-ratio bench, docs/fusion.md Finding 5): the canvas is twice as wide, a "left"
    object lies in the left third of the whole width (outside a centre crop of the middle half), multi-object
    scenes spread over the width, and the square render is unchanged by the new argument."""
    for seed in range(5):
        for position in POSITIONS:
            image = render_scene(Scene("blue", "triangle", "small", 1, position), 64, random.Random(seed), aspect=2)
            assert image.size == (128, 64)
            ys, xs = np.nonzero(_object_mask(image))
            cx, cy = xs.mean() / 128, ys.mean() / 64
            expected = {"left": cx < 0.25, "right": cx > 0.75, "top": cy < 0.33, "bottom": cy > 0.67}[position]
            assert expected, (position, cx, cy)
    rng, xs = random.Random(0), []
    for _ in range(100):
        scene = random_scene(rng)
        image = render_scene(scene, 64, rng, aspect=2)
        mask = _object_mask(image)
        assert _components(mask) == scene.count
        xs += list(np.nonzero(mask)[1] / 128)
    assert min(xs) < 0.1 and max(xs) > 0.9, "objects are spread over the whole width"
    square = Scene("red", "circle", "large", 2, None)
    assert (np.asarray(render_scene(square, 64, random.Random(1), aspect=1))
            == np.asarray(render_scene(square, 64, random.Random(1)))).all()


def test_scene_rejects_ill_defined_positions() -> None:
    with pytest.raises(ValueError):
        Scene("red", "circle", "small", 2, "left")
    with pytest.raises(ValueError):
        Scene("red", "circle", "small", 1, None)
    with pytest.raises(ValueError):
        Scene("pink", "circle", "small", 1, "left")


def test_captions() -> None:
    assert caption(Scene("red", "circle", "large", 1, "left")) == "a large red circle on the left."
    assert caption(Scene("blue", "square", "small", 2)) == "two small blue squares."
    assert caption(Scene("green", "triangle", "small", 1, "bottom")) == "a small green triangle at the bottom."


def test_questions_are_answerable_and_consistent() -> None:
    rng = random.Random(1)
    phrasings: dict[str, set[str]] = {t: set() for t in QUESTION_TYPES}
    for _ in range(300):
        scene = random_scene(rng)
        qas = questions(scene, rng)
        types = [t for t, _, _ in qas]
        expected_types = [t for t in QUESTION_TYPES if t != "position" or scene.count == 1]
        assert types == expected_types
        truth = {"colour": scene.colour, "shape": scene.shape, "size": scene.size,
                 "count": str(scene.count), "position": scene.position}
        for qtype, question, answer in qas:
            assert answer == truth[qtype]
            assert answer.isdigit() or (answer.isalpha() and answer.islower())
            assert question.endswith("?") or question.endswith(".")
            if qtype != "size":  # size questions may offer both options ("small or large?")
                assert answer not in question.lower().replace("?", " ").split()
            phrasings[qtype].add(question.replace(scene.colour, "C").replace(scene.shape, "S").replace(scene.size, "Z"))
    for qtype, seen in phrasings.items():
        assert len(seen) >= 3, (qtype, seen)


def test_dataset_files_and_format(tmp_path) -> None:
    paths = make_synthetic_dataset(tmp_path, n_train=12, n_eval=3, n_test=6, image_size=64, seed=7)
    assert set(paths) == {"train", "eval", "test"}
    for split in ("train", "eval"):
        samples = json.loads(paths[split].read_text())
        assert len(samples) == {"train": 12, "eval": 3}[split]
        for i, s in enumerate(samples):
            assert s["id"] == f"{split}-{i:05d}" and s["image"] == f"images/{split}_{i:05d}.png"
            assert (tmp_path / s["image"]).is_file()
            conv = s["conversations"]
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            assert sum(t["value"].count("<image>") for t in conv) == 1
            assert conv[0]["value"].startswith("<image>\n")
            answers = [t["value"] for t in conv[1::2]]
            captions = [a for a in answers if " " in a]
            assert len(captions) == 1 and len(conv) // 2 in (5, 6)
            # The caption must describe the image that was written.
            image = _read(tmp_path / s["image"])
            mask = _object_mask(image)
            words = captions[0].rstrip(".").split()
            assert _nearest_colour(np.asarray(image)[mask].mean(0)) == words[2]
            assert _components(mask) == {"a": 1, "two": 2, "three": 3}[words[0]]

    test = json.loads(paths["test"].read_text())
    by_image: dict[str, set[str]] = {}
    for s in test:
        conv = s["conversations"]
        assert len(conv) == 2 and conv[0]["value"].startswith("<image>\n") and conv[0]["value"].count("<image>") == 1
        assert s["answers"] == [conv[1]["value"]]
        assert s["id"] == s["image"].replace("images/test_", "test-").replace(".png", "") + "-" + s["type"]
        by_image.setdefault(s["image"], set()).add(s["type"])
    assert len(by_image) == 6
    for types in by_image.values():
        assert {"caption", "colour", "shape", "size", "count"} <= types <= {"caption", *QUESTION_TYPES}


def test_dataset_is_deterministic_per_seed(tmp_path) -> None:
    a = make_synthetic_dataset(tmp_path / "a", 4, 2, 3, seed=1)
    b = make_synthetic_dataset(tmp_path / "b", 4, 2, 3, seed=1)
    c = make_synthetic_dataset(tmp_path / "c", 4, 2, 3, seed=2)
    for split in a:
        assert a[split].read_text() == b[split].read_text()
    assert a["train"].read_text() != c["train"].read_text()
    for name in ("train_00003.png", "test_00002.png"):
        pixels = [np.asarray(_read(tmp_path / d / "images" / name)) for d in "ab"]
        assert np.array_equal(*pixels)


def test_text_corpus() -> None:
    lines = text_corpus(200, seed=0)
    assert len(lines) == 200 and lines == text_corpus(200, seed=0) and lines != text_corpus(200, seed=1)
    assert all(line and "<image>" not in line for line in lines)
    assert any(line.endswith(".") for line in lines) and any(line.split()[-1].isdigit() for line in lines)


def test_hires_variant_one_small_object_off_the_tile_borders(tmp_path):
    from vlm.embedded.synthetic import COLOURS, HIRES_SIZE, SHAPES, make_hires_dataset

    paths = make_hires_dataset(tmp_path, n_train=3, n_eval=1, n_test=4, seed=0)
    test = json.loads(paths["test"].read_text())
    assert [r["type"] for r in test[:2]] == ["shape", "colour"] and len(test) == 8
    for record in test[::2]:
        assert record["answers"][0] in SHAPES
        pixels = np.asarray(Image.open(tmp_path / record["image"]))
        assert pixels.shape == (HIRES_SIZE, HIRES_SIZE, 3)
        ys, xs = np.nonzero(pixels.std(-1) > 20)  # the coloured object (the background is grey)
        half = HIRES_SIZE // 2
        assert 0 < len(xs) < 0.01 * HIRES_SIZE**2  # small
        assert (xs < half).all() or (xs >= half).all()  # within one tile of a 2x2 grid
        assert (ys < half).all() or (ys >= half).all()
    assert all(r["answers"][0] in COLOURS for r in test[1::2])
    assert len(json.loads(paths["train"].read_text())[0]["conversations"]) == 4
