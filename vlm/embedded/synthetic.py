"""Synthetic "coloured shapes" VQA data: the embedded default dataset.

No data can be downloaded, so the quickstart renders its own images. The design keeps
every question unambiguous for a patch-8 ViT at 64 px: all objects in an image are
identical (same colour, shape and size), large is ~2x the radius of small, objects never
overlap, and position is only defined (and only asked) for a single object, which is
then placed clearly in one of four regions.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 215, 20),
    "purple": (140, 50, 190),
    "orange": (250, 135, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
COUNTS: tuple[int, ...] = (1, 2, 3)
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "position", "size", "count")

NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
# Half-extent of an object in pixels at 64 px; scaled with the image size.
_RADIUS = {"small": (5.5, 6.8), "large": (11.5, 12.5)}
# Object centre (fractions of the image side) for single-object scenes.
_ANCHORS = {"left": (0.22, 0.5), "right": (0.78, 0.5), "top": (0.5, 0.22), "bottom": (0.5, 0.78)}
_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}

CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image.",
    "What is in this picture?",
    "Give a short caption for the image.",
    "Describe what you see.",
)

# Placeholders: {is}/{Is} is/are, {obj} object(s), {shp} square(s), {pl} squares, {col}, {size}.
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": (
        "What colour {is} the {shp}?",
        "What color {is} the {obj}?",
        "Which colour {is} the {size} {obj}?",
        "What is the colour of the {shp}?",
    ),
    "shape": (
        "What shape {is} the {col} {obj}?",
        "Which shape is in the image?",
        "What kind of shape {is} the {size} {obj}?",
        "Name the shape.",
    ),
    "size": (
        "{Is} the {shp} small or large?",
        "What size {is} the {col} {shp}?",
        "How big {is} the {obj}?",
        "{Is} the {obj} large or small?",
    ),
    "count": (
        "How many {pl} are there?",
        "How many {col} objects are in the image?",
        "How many objects can you see?",
        "Count the shapes.",
    ),
    "position": (
        "Where is the {shp}?",
        "Where is the {col} {obj}?",
        "On which side of the image is the {size} {shp}?",
        "Where is the object located?",
    ),
}


@dataclass(frozen=True)
class Scene:
    """What an image shows; `position` is set only when `count == 1`."""

    colour: str
    shape: str
    size: str
    count: int
    position: str | None = None

    def __post_init__(self) -> None:
        if self.colour not in COLOURS or self.shape not in SHAPES or self.size not in SIZES:
            raise ValueError(f"unknown attribute in {self}")
        if self.count not in COUNTS:
            raise ValueError(f"count must be one of {COUNTS}, got {self.count}")
        if (self.position is not None) != (self.count == 1) or self.position not in (None, *POSITIONS):
            raise ValueError(f"position must be one of {POSITIONS} iff count == 1, got {self}")


def random_scene(rng: random.Random) -> Scene:
    """Draw attributes uniformly; position only for single-object scenes."""
    count = rng.choice(COUNTS)
    return Scene(
        colour=rng.choice(list(COLOURS)),
        shape=rng.choice(SHAPES),
        size=rng.choice(SIZES),
        count=count,
        position=rng.choice(POSITIONS) if count == 1 else None,
    )


def canvas_size(image_size: int, aspect: float = 1.0) -> tuple[int, int]:
    """(width, height) of a rendered scene: `image_size` high, `aspect` times as wide."""
    return round(image_size * aspect), image_size


def layout(scene: Scene, image_size: int = 64, rng: random.Random | None = None,
           aspect: float = 1.0) -> list[tuple[float, float, float]]:
    """Object placements as (cx, cy, radius) in pixels; non-overlapping and inside the image, which is
    `image_size` high and `round(image_size * aspect)` wide (objects spread over the whole width)."""
    rng = rng or random.Random(0)
    scale = image_size / 64.0
    width, _ = canvas_size(image_size, aspect)
    lo, hi = _RADIUS[scene.size]
    radius = rng.uniform(lo, hi) * scale
    margin = radius + 2 * scale
    if scene.count == 1:
        ax, ay = _ANCHORS[scene.position]
        jitter = 2.5 * scale
        cx, cy = (min(side - margin, max(margin, a * side + rng.uniform(-jitter, jitter)))
                  for a, side in ((ax, width), (ay, image_size)))
        return [(cx, cy, radius)]
    gap = 2 * radius + 4 * scale
    for _ in range(1000):
        pts = [tuple(rng.uniform(margin, side - margin) for side in (width, image_size)) for _ in range(scene.count)]
        if all((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 >= gap**2 for i, a in enumerate(pts) for b in pts[i + 1 :]):
            return [(x, y, radius) for x, y in pts]
    # Rejection sampling practically never fails; fall back to a fixed, shuffled spread.
    slots = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]
    rng.shuffle(slots)
    return [(x * width, y * image_size, radius) for x, y in slots[: scene.count]]


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = 0.85 * r  # area close to the circle's so size is not confused with shape
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "diamond":
        d = 1.1 * r  # a bit larger, else small diamonds are too few pixels to tell from circles
        return [(cx, cy - d), (cx + d, cy), (cx, cy + d), (cx - d, cy)]
    raise ValueError(shape)


def render_scene(scene: Scene, image_size: int = 64, rng: random.Random | None = None,
                 aspect: float = 1.0) -> Image.Image:
    """Draw the scene on a plain light background, `image_size` high and `aspect` times as wide; `rng`
    only jitters placement and tint."""
    rng = rng or random.Random(0)
    placements = layout(scene, image_size, rng, aspect)  # first, so layout() with the same rng state replays it
    grey = rng.randint(225, 250)
    image = Image.new("RGB", canvas_size(image_size, aspect), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    fill = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in COLOURS[scene.colour])
    for cx, cy, r in placements:
        _draw_shape(draw, scene.shape, cx, cy, r, fill)
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)


def caption(scene: Scene) -> str:
    """E.g. 'two small blue squares.' or 'a large red circle on the left.'"""
    if scene.count == 1:
        return f"a {scene.size} {scene.colour} {scene.shape} {_WHERE[scene.position]}."
    return f"{NUMBER_WORDS[scene.count]} {scene.size} {scene.colour} {scene.shape}s."


def answer(scene: Scene, qtype: str) -> str:
    """The single-word ground truth for a question type."""
    if qtype == "count":
        return str(scene.count)
    if qtype == "position" and scene.position is None:
        raise ValueError("position is only defined for single-object scenes")
    return getattr(scene, qtype)


def question_types(scene: Scene) -> list[str]:
    """Types that have a well-defined answer for this scene."""
    return [t for t in QUESTION_TYPES if t != "position" or scene.count == 1]


def questions(scene: Scene, rng: random.Random | None = None) -> list[tuple[str, str, str]]:
    """One (type, question, answer) per answerable type, with a randomly chosen phrasing.

    Phrasings mention the other attributes but never the answer, so the model must read
    which attribute is asked for and look at the image to answer it.
    """
    rng = rng or random.Random(repr(scene))
    many = scene.count > 1
    slots = {
        "is": "are" if many else "is",
        "Is": "Are" if many else "Is",
        "obj": "objects" if many else "object",
        "shp": scene.shape + ("s" if many else ""),
        "pl": scene.shape + "s",
        "col": scene.colour,
        "size": scene.size,
    }
    return [(t, rng.choice(_TEMPLATES[t]).format(**slots), answer(scene, t)) for t in question_types(scene)]


def _conversation(first_image: bool, turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    conv = []
    for i, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": ("<image>\n" + q) if (i == 0 and first_image) else q})
        conv.append({"from": "gpt", "value": a})
    return conv


def _write_split(out_dir: Path, split: str, n: int, image_size: int, seed: int) -> list[dict]:
    # String seeds hash deterministically (sha512), so each split is reproducible on its own.
    rng = random.Random(f"synthetic:{seed}:{split}")
    samples: list[dict] = []
    for i in range(n):
        scene = random_scene(rng)
        rel = f"images/{split}_{i:05d}.png"
        render_scene(scene, image_size, rng).save(out_dir / rel)
        qas = questions(scene, rng)
        cap = caption(scene)
        if split == "test":
            for qtype, q, a in [("caption", rng.choice(CAPTION_PROMPTS), cap), *qas]:
                samples.append({
                    "id": f"test-{i:05d}-{qtype}",
                    "image": rel,
                    "conversations": _conversation(True, [(q, a)]),
                    "type": qtype,
                    "answers": [a],
                })
        else:
            turns = [(rng.choice(CAPTION_PROMPTS), cap)] + [(q, a) for _, q, a in qas]
            rng.shuffle(turns)
            samples.append({"id": f"{split}-{i:05d}", "image": rel, "conversations": _conversation(True, turns)})
    return samples


def make_synthetic_dataset(
    out_dir: str | Path,
    n_train: int,
    n_eval: int,
    n_test: int,
    image_size: int = 64,
    seed: int = 0,
) -> dict[str, Path]:
    """Render images and write LLaVA-style train/eval JSON and per-question test JSON."""
    return write_splits(out_dir, {"train": n_train, "eval": n_eval, "test": n_test},
                        lambda out, split, n: _write_split(out, split, n, image_size, seed))


HIRES_SIZE = 256
"""Side of a high-resolution image: 4x the tiny tower's 64 px input, 2x a tile of a 2x2 grid's."""
_HIRES_RADIUS = (9.5, 11.0)
"""Object half-extent at 256 px: ~5 px on a 64 px tile (a shape the tower tells apart), ~2.5 px once the
whole image is shrunk to 64 px (a blob of a few pixels, its shape gone and its colour mixed with the
background: measured, untiled colour accuracy is 36.7% against 71.7% tiled, docs/benchmarks.md#tiling)."""


def render_hires(rng: random.Random) -> tuple[Image.Image, str, str]:
    """One small object somewhere on a 256 px canvas, never across the middle lines (a 2x2 grid's tile
    borders), with distractor-free background: (image, colour, shape)."""
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    radius = rng.uniform(*_HIRES_RADIUS)
    half, margin = HIRES_SIZE // 2, radius * 1.2 + 3
    cx, cy = (rng.choice((0, half)) + rng.uniform(margin, half - margin) for _ in "xy")
    grey = rng.randint(225, 250)
    image = Image.new("RGB", (HIRES_SIZE, HIRES_SIZE), (grey, grey, grey))
    fill = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in COLOURS[colour])
    _draw_shape(ImageDraw.Draw(image), shape, cx, cy, radius, fill)
    return image, colour, shape


def _write_hires_split(out_dir: Path, split: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"hires:{seed}:{split}")
    samples: list[dict] = []
    for i in range(n):
        image, colour, shape = render_hires(rng)
        rel = f"images/hires_{split}_{i:05d}.png"
        image.save(out_dir / rel)
        qas = [("shape", rng.choice(("What shape is the small object?", "Name the shape.")), shape),
               ("colour", rng.choice(("What colour is the small object?", "What color is it?")), colour)]
        if split == "test":
            samples += [{"id": f"test-{i:05d}-{t}", "image": rel, "conversations": _conversation(True, [(q, a)]),
                         "type": t, "answers": [a]} for t, q, a in qas]
        else:
            rng.shuffle(qas)
            samples.append({"id": f"{split}-{i:05d}", "image": rel,
                            "conversations": _conversation(True, [(q, a) for _, q, a in qas])})
    return samples


def make_hires_dataset(out_dir: str | Path, n_train: int, n_eval: int, n_test: int, seed: int = 0) -> dict[str, Path]:
    """The high-resolution variant (for tiling, docs/tiling.md): 256 px images of one small object, asked
    its shape and its colour, both blurred when the image is shrunk to the tower's 64 px."""
    return write_splits(out_dir, {"train": n_train, "eval": n_eval, "test": n_test},
                        lambda out, split, n: _write_hires_split(out, split, n, seed))


def write_splits(
    out_dir: str | Path, sizes: dict[str, int], write_split: Callable[[Path, str, int], list[dict]]
) -> dict[str, Path]:
    """`out_dir/images/` and one `<split>.json` per split, from `write_split(out_dir, split, n)` (which
    renders that split's images and returns its records); shared by the synthetic variants."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split, n in sizes.items():
        samples = write_split(out_dir, split, n)
        paths[split] = out_dir / f"{split}.json"
        paths[split].write_text(json.dumps(samples, indent=1))
    return paths


def text_corpus(n: int, seed: int) -> list[str]:
    """`n` lines of caption and question-answer text, for the tokenizer and LM pre-training.

    The answer follows its prompt after a space or at the start of a new line, as words do in a
    real LM's web text. A byte-level tokenizer splits "red" and " red" into different tokens, and
    a chat template puts the answer at the start of a line: an LM that only ever saw " red" has
    never emitted the tokens the fine-tune needs, which a full fine-tune relearns and LoRA, with
    the vocabulary frozen, cannot (docs/lora.md).
    """
    rng = random.Random(f"corpus:{seed}")
    lines: list[str] = []
    while len(lines) < n:
        scene = random_scene(rng)
        if rng.random() < 0.3:
            prompt, answer = rng.choice(CAPTION_PROMPTS), caption(scene)
        else:
            _, prompt, answer = rng.choice(questions(scene, rng))
        lines.append(prompt + rng.choice((" ", "\n")) + answer)
    return lines
