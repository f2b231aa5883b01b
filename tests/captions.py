"""Eight scenes of distinct colour / shape / size / count, each asked for a caption and a colour: small
enough that 120 training steps learn them, so a model's answers must depend on the image. Trained on
by the generation tests (every fusion) and served by the `vlm serve` / chat tests (projector)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from vlm.embedded.synthetic import Scene, caption, render_scene

PROJECTOR = ["model.fusion=projector", "model.projector.type=mlp2x_gelu"]
"""The caption model's fusion overrides (for `train_captioner` in conftest.py)."""
STRATEGIES = {
    "projector": PROJECTOR,
    "resampler": ["model.fusion=resampler", "model.resampler.latents=8"],
    "early": ["model.fusion=early"],
    "cross_attention": ["model.fusion=cross_attention", "model.cross_attention.every_n_layers=2"],
    # The product, as the fusion benchmark runs late fusion: with the default mixture the question-blind
    # image head and the LM take turns, and 120 steps do not make captions depend on the image (both
    # images captioned 'a large red circle on the left.'). Decoding runs the same loop for either.
    "late": ["model.fusion=late", "model.late.combine=product"],
}
"""Each fusion's overrides for `train_captioner` (conftest.py), as the generation tests train them."""
SCENES = [Scene("red", "circle", "large", 1, "left"), Scene("blue", "square", "small", 1, "right"),
          Scene("green", "triangle", "large", 2), Scene("yellow", "diamond", "small", 3),
          Scene("purple", "circle", "small", 1, "top"), Scene("orange", "square", "large", 1, "bottom"),
          Scene("red", "triangle", "small", 3), Scene("blue", "diamond", "large", 2)]


def write_captions_file(root: Path) -> Path:
    """The scenes as PNGs and a LLaVA JSON of two-turn conversations (caption, then colour); returns it."""
    records = []
    for i, scene in enumerate(SCENES):
        render_scene(scene, rng=random.Random(i)).save(root / f"{i}.png")
        records.append({"id": f"c{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": caption(scene)},
            {"from": "human", "value": "What colour is the shape?"}, {"from": "gpt", "value": scene.colour}]})
    (root / "train.json").write_text(json.dumps(records))
    return root / "train.json"


def write_questions_file(captions_file: Path, out: Path) -> Path:
    """A test file over the same images: each scene asked for a caption (one turn), and for its colour
    after its caption (two turns), with absolute image paths."""
    records = []
    for record in json.loads(captions_file.read_text()):
        image, turns = str(captions_file.parent / record["image"]), record["conversations"]
        records.append({"id": f"{record['id']}-caption", "image": image, "conversations": turns[:2]})
        records.append({"id": f"{record['id']}-colour", "image": image, "conversations": turns})
    out.write_text(json.dumps(records))
    return out
