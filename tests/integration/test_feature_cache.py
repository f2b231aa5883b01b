import json

import pytest
import torch
from PIL import Image

from vlm.config import load_config
from vlm.data.feature_cache import FeatureCache, encoder_fingerprint
from vlm.data.formats import read_samples
from vlm.factory import processor_for
from vlm.train import train


def run(backbones, synthetic, out, cache: bool, extra: tuple[str, ...] = ()) -> list[float]:
    config = load_config(None, [*extra, 
        f"model.vision={backbones['vit']}", f"model.lm={backbones['lm']}", "model.projector.type=mlp2x_gelu",
        f"data.train_files=[{synthetic['train']}]", f"data.cache_features={str(cache).lower()}",
        "train.stage=align", "train.max_steps=6", "train.batch_size=4", "train.lr=1e-3", "train.report_to=none",
        f"output_dir={out}",
    ])
    train(config)
    return [h["loss"] for h in json.loads((out / "train_summary.json").read_text())["history"]]


def test_cached_features_give_the_same_losses(backbones, synthetic, tmp_path):
    plain = run(backbones, synthetic, tmp_path / "plain", cache=False)
    cached = run(backbones, synthetic, tmp_path / "cached", cache=True)
    assert len(plain) == len(cached) == 6
    assert max(abs(a - b) for a, b in zip(plain, cached)) <= 1e-5
    assert list((tmp_path / "cached" / "feature_cache").rglob("*.safetensors"))


def test_blank_dropped_images_are_cached_and_train_as_uncached(backbones, synthetic, tmp_path):
    blank = ("train.image_dropout=0.5", "train.dropped_image=blank")
    plain = run(backbones, synthetic, tmp_path / "plain", cache=False, extra=blank)
    cached = run(backbones, synthetic, tmp_path / "cached", cache=True, extra=blank)
    removed = run(backbones, synthetic, tmp_path / "removed", cache=True, extra=blank[:1])
    assert max(abs(a - b) for a, b in zip(plain, cached)) <= 1e-5
    assert max(abs(a - b) for a, b in zip(cached, removed)) > 1e-4  # a grey image is not the same as none
    images = {im for s in read_samples(synthetic["train"])[0] for im in s.images}
    assert len(list((tmp_path / "cached" / "feature_cache").rglob("*.safetensors"))) == len(images) + 1


def test_corrupt_entries_are_rebuilt_and_keys_follow_content(tiny_vlm, synthetic, tmp_path):
    vision = tiny_vlm.vision
    samples = read_samples(synthetic["eval"])[0][:4]
    cache = FeatureCache(tmp_path, encoder_fingerprint(vision), (vision.num_patches, vision.hidden_size))
    assert cache.fill(samples, processor_for(tiny_vlm), vision) == 4
    assert cache.fill(samples, processor_for(tiny_vlm), vision) == 0  # everything already there

    image = samples[0].images[0]
    pixels = processor_for(tiny_vlm).image_transform(Image.open(image)).unsqueeze(0)
    torch.testing.assert_close(cache.get(image), vision(pixels)[0])

    entry = next(p for p in cache.root.rglob("*.safetensors") if p.stem == cache.key(image))
    entry.write_bytes(entry.read_bytes()[:50])  # a partial write
    assert cache.get(image) is None and not entry.exists() and cache.rebuilt == 1
    assert cache.fill(samples, processor_for(tiny_vlm), vision) == 1

    changed = tmp_path / "changed.png"
    Image.open(image).transpose(Image.FLIP_LEFT_RIGHT).save(changed)
    assert cache.key(str(changed)) != cache.key(image)
    with torch.no_grad():
        next(vision.parameters()).add_(0.1)
    assert encoder_fingerprint(vision) != cache.fingerprint  # new weights -> a different cache folder


def test_cache_refuses_a_trained_encoder(backbones, synthetic, tmp_path, monkeypatch):
    import vlm.train.freezing as freezing

    monkeypatch.setitem(freezing.STAGES, "align", {"vision": True, "fusion": True, "lm": False})
    with pytest.raises(ValueError, match="needs a frozen vision encoder"):
        run(backbones, synthetic, tmp_path / "x", cache=True)


def test_one_unreadable_image_costs_only_itself(tiny_vlm, synthetic, tmp_path):
    """Images are encoded in chunks; a bad one among them must not leave its good neighbours uncached
    (they would be skipped as `not_cached` in training)."""
    vision = tiny_vlm.vision
    samples = read_samples(synthetic["eval"])[0][:4]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    samples[1].images = [str(bad)]
    cache = FeatureCache(tmp_path / "cache", encoder_fingerprint(vision), (vision.num_patches, vision.hidden_size))
    cache.fill(samples, processor_for(tiny_vlm), vision, batch_size=4)
    cached = [cache.get(s.images[0]) is not None for s in samples]
    assert cached == [True, False, True, True]
