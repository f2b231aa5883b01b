"""A long-tailed length mix like LLaVA-665k's, for packing and batching measurements.

LLaVA's instruction mix pairs many short VQA turns with long detailed descriptions and some
text-only chat, so sample lengths span two orders of magnitude. This generates the same shape
offline: 1-6 turns per conversation, each answer 5-200 words (log-uniform: most short, a long
tail), ~6% text-only samples (as ShareGPT is in LLaVA-665k). Images and words come from the
synthetic "coloured shapes" world, so the tiny tokenizer knows them; only the lengths matter.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from .synthetic import caption, questions, random_scene, render_scene, write_splits


def _answer(rng: random.Random, scene_words: list[str], words: int) -> str:
    return " ".join(rng.choice(scene_words) for _ in range(words)).capitalize() + "."


def _write(out_dir: Path, split: str, n: int, seed: int, images: int, text_only: float) -> list[dict]:
    rng = random.Random(f"long_tail:{seed}:{split}")
    pool = []
    for i in range(images):
        scene = random_scene(rng)
        rel = f"images/{split}_lt_{i:04d}.png"
        render_scene(scene, 64, rng).save(out_dir / rel)
        pool.append((rel, scene))
    records = []
    for i in range(n):
        rel, scene = rng.choice(pool)
        words = (caption(scene) + " " + " ".join(q + " " + a for _, q, a in questions(scene, rng))).split()
        with_image = rng.random() >= text_only
        conversation = []
        for turn in range(rng.randint(1, 6)):
            _, question, _ = rng.choice(questions(scene, rng))
            length = round(math.exp(rng.uniform(math.log(5), math.log(200))))
            prefix = "<image>\n" if turn == 0 and with_image else ""
            conversation += [{"from": "human", "value": prefix + question},
                             {"from": "gpt", "value": _answer(rng, words, length)}]
        record = {"id": f"{split}-lt-{i:05d}", "conversations": conversation}
        if with_image:
            record["image"] = rel
        records.append(record)
    return records


def make_long_tail_dataset(
    out_dir: str | Path, n: int, seed: int = 0, images: int = 64, text_only: float = 0.06,
) -> Path:
    """`out_dir/train.json` of `n` LLaVA-format conversations (and the `images` they share); returns its path."""
    return write_splits(out_dir, {"train": n}, lambda out, split, k: _write(out, split, k, seed, images, text_only))[
        "train"]
