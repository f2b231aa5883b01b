"""Test-time image corruptions (vlm/eval/corruptions.py): deterministic, graded, size-preserving."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from vlm.data.formats import read_samples
from vlm.eval.corruptions import CORRUPTIONS, SEVERITIES, corrupt, corrupt_data_file, parse_corruption


def textured(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    """Smooth blobs plus fine texture: every corruption changes it visibly."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse, "RGB").resize((width, height), Image.BILINEAR), dtype=np.int16)
    fine = rng.integers(-40, 41, size=(height, width, 3))
    return Image.fromarray(np.clip(base + fine, 0, 255).astype(np.uint8), "RGB")


def diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_same_seed_same_bytes_and_size_and_mode_kept(kind):
    image = textured(80, 48)
    for severity in SEVERITIES:
        a, b = corrupt(image, kind, severity, seed=3), corrupt(image, kind, severity, seed=3)
        assert a.tobytes() == b.tobytes()
        assert a.size == image.size and a.mode == "RGB"
    assert corrupt(image.convert("L"), kind, 1, seed=0).mode == "RGB"


@pytest.mark.parametrize("kind", ["noise", "occlusion"])
def test_different_seed_different_pattern(kind):
    image = textured()
    assert corrupt(image, kind, 2, seed=0).tobytes() != corrupt(image, kind, 2, seed=1).tobytes()


@pytest.mark.parametrize("size", [64, 384])
@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_severity_is_monotone(kind, size):
    image = textured(size, size)
    distances = [diff(image, corrupt(image, kind, s, seed=0)) for s in SEVERITIES]
    assert 0 < distances[0] < distances[1] < distances[2], distances


def test_blur_scales_with_image_size():
    """The same picture at 64 and 256 px, blurred at the same severity, looks the same once downsized."""
    small = textured(64, 64)
    large = small.resize((256, 256), Image.BICUBIC)
    blurred_small = corrupt(small, "blur", 2, seed=0)
    blurred_large = corrupt(large, "blur", 2, seed=0).resize((64, 64), Image.BICUBIC)
    unscaled = large.filter(ImageFilter.GaussianBlur(1.5)).resize((64, 64), Image.BICUBIC)
    assert diff(blurred_small, blurred_large) < diff(blurred_small, unscaled)


@pytest.mark.parametrize("width, height", [(64, 64), (200, 120), (300, 40)])
@pytest.mark.parametrize("severity, fraction", list(zip(SEVERITIES, (0.10, 0.25, 0.50))))
def test_occluded_area_matches_the_target(width, height, severity, fraction):
    image = Image.new("RGB", (width, height), (255, 0, 0))  # no grey anywhere before
    for seed in range(3):
        pixels = np.asarray(corrupt(image, "occlusion", severity, seed=seed))
        grey = np.all(pixels == 128, axis=-1)
        assert abs(grey.mean() - fraction) < 0.02, (grey.mean(), fraction)
        rows, cols = np.nonzero(grey)  # one solid rectangle inside the image
        assert grey[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()


def test_bad_kind_or_severity_names_the_valid_ones():
    image = textured()
    with pytest.raises(ValueError, match="noise, blur, occlusion"):
        corrupt(image, "fog", 1, seed=0)
    for severity in (0, 4, True):
        with pytest.raises(ValueError, match="1, 2, 3"):
            corrupt(image, "noise", severity, seed=0)


def test_parse_corruption():
    assert parse_corruption("noise:2") == ("noise", 2)
    assert parse_corruption(" occlusion:3 ") == ("occlusion", 3)
    for bad in ("noise", "noise:", "noise:x", "fog:1", "blur:4", ":1", "blur:1:2"):
        with pytest.raises(ValueError, match="KIND:SEVERITY") as err:
            parse_corruption(bad)
        assert "\n" not in str(err.value)


def make_data(folder, records, images):
    (folder / "img").mkdir(parents=True)
    for name, seed in images.items():
        textured(48, 40, seed).save(folder / "img" / name)
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


RECORDS = [
    {"id": "a", "image": "img/one.jpg", "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                                          {"from": "gpt", "value": "A."}]},
    {"id": "b", "image": ["img/one.jpg", "img/two.png"],
     "conversations": [{"from": "human", "value": "<image><image>\nQ?"}, {"from": "gpt", "value": "B."}]},
    {"id": "c", "conversations": [{"from": "human", "value": "Text only?"}, {"from": "gpt", "value": "C."}]},
]


def test_corrupt_data_file_writes_copies_and_leaves_the_source(tmp_path, monkeypatch):
    source = make_data(tmp_path / "src", RECORDS, {"one.jpg": 1, "two.png": 2})
    before = {p: p.read_bytes() for p in (tmp_path / "src").rglob("*") if p.is_file()}
    opened = []
    original_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(str(fp)) or original_open(fp, *a, **k))
    out = corrupt_data_file(source, tmp_path / "out", "noise", 2, seed=5)
    monkeypatch.undo()
    assert out == tmp_path / "out" / "data.json"
    assert sorted(opened) == sorted({str(tmp_path / "src" / "img" / n) for n in ("one.jpg", "two.png")})  # once each
    records = json.loads(out.read_text())
    assert records[2] == RECORDS[2]  # no image: unchanged
    assert records[0]["image"] == records[1]["image"][0] != RECORDS[0]["image"]
    for name in [records[0]["image"], *records[1]["image"]]:
        copy = tmp_path / "out" / name
        assert name.startswith("images/") and copy.suffix == ".png" and copy.is_file()
        assert Image.open(copy).size == (48, 40)
    one, two = (np.asarray(Image.open(tmp_path / "out" / n), dtype=np.int16) for n in records[1]["image"])
    noise_one = one - np.asarray(Image.open(tmp_path / "src" / "img" / "one.jpg"), dtype=np.int16)
    noise_two = two - np.asarray(Image.open(tmp_path / "src" / "img" / "two.png"), dtype=np.int16)
    assert not np.array_equal(noise_one, noise_two)  # each image its own noise
    assert {p: p.read_bytes() for p in (tmp_path / "src").rglob("*") if p.is_file()} == before
    assert not list((tmp_path / "out").rglob("*.tmp"))
    samples, errors = read_samples(out)  # the training reader takes the corrupted file as it is
    assert not errors and len(samples) == 3

    again = corrupt_data_file(source, tmp_path / "again", "noise", 2, seed=5)
    for name in records[1]["image"]:
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()
    assert json.loads(again.read_text()) == records


def test_corrupt_data_file_reads_images_under_image_root(tmp_path):
    make_data(tmp_path / "root", [], {"one.jpg": 1})
    data = tmp_path / "annotations" / "set.json"
    data.parent.mkdir()
    data.write_text(json.dumps([{"image": "img/one.jpg", "caption": "x"}]))
    out = corrupt_data_file(data, tmp_path / "out", "occlusion", 1, image_root=tmp_path / "root")
    [record] = json.loads(out.read_text())
    assert out.name == "set.json" and (tmp_path / "out" / record["image"]).is_file()
    with pytest.raises(ValueError, match="noise, blur, occlusion"):
        corrupt_data_file(data, tmp_path / "bad", "fog", 1, image_root=tmp_path / "root")
