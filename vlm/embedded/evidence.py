"""Evidence-bearing variant of the synthetic "coloured shapes" VQA data.

A fusion benchmark must tell how a model degrades when the image is missing or corrupted, so
some questions here are answerable from a short text note in the first user turn
(`"<image>\\nNote: {note}\\n{question}"`). Every test item is labelled with where its answer lives:

- `image`: the plain synthetic questions and the caption; no note.
- `note`: only the note says where the picture was taken; the image carries nothing about it.
- `redundant`: the note states the asked attribute, consistent with the image.
- `complementary`: the note maps two colours to two places; the image says which colour applies.
- `conflict` (test only): the note states a wrong value; `answers` keep the image's value and
  `note_answer` the note's, to measure which modality a model trusts.

Images and image questions come from `synthetic.py`, unchanged.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

from .synthetic import (
    CAPTION_PROMPTS,
    COLOURS,
    COUNTS,
    NUMBER_WORDS,
    SHAPES,
    SIZES,
    Scene,
    caption,
    questions,
    random_scene,
    render_scene,
    write_splits,
)

NOTE_PREFIX = "Note: "
# Chosen because the tiny tokenizer has merges for them.
PLACES: tuple[str, ...] = ("garden", "market", "street", "school")
NOTE_ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "count")
EVIDENCE: tuple[str, ...] = ("image", "note", "redundant", "complementary", "conflict")
TRAIN_NOTE_KINDS: tuple[str, ...] = ("none", "place", "attribute", "mapping")
CONFLICT_RATE = 0.25

PLACE_QUESTIONS: tuple[str, ...] = (
    "Where was the picture taken?",
    "Where was this picture taken?",
    "In which place was the picture taken?",
    "Where was the photo taken?",
)
# {obj} object(s), {does} does/do.
_ORIGIN_QUESTIONS: tuple[str, ...] = (
    "Where {does} the {obj} come from?",
    "Which place {does} the {obj} come from?",
    "From which place {does} the {obj} come?",
)


def place_note(place: str) -> str:
    """The note for a `note` item: the only source of the answer."""
    return f"the picture was taken at the {place}."


def attribute_note(attribute: str, value: str, count: int) -> str:
    """A note stating `value` for `attribute`; `count` sets the grammar (ignored for count notes)."""
    many = count > 1
    if attribute == "count":
        n = int(value)
        return f"there {'are' if n > 1 else 'is'} {NUMBER_WORDS[n]} object{'s' if n > 1 else ''}."
    if attribute == "shape":
        return f"the shapes are {value}s." if many else f"the shape is a {value}."
    if attribute in ("colour", "size"):
        return f"the objects are {value}." if many else f"the object is {value}."
    raise ValueError(f"no note for attribute {attribute!r}")


def mapping_note(pairs: list[tuple[str, str]]) -> str:
    """E.g. 'red objects come from the garden and blue objects come from the market.'"""
    return " and ".join(f"{colour} objects come from the {place}" for colour, place in pairs) + "."


def _truth(scene: Scene, attribute: str) -> str:
    return str(scene.count) if attribute == "count" else getattr(scene, attribute)


def _values(attribute: str) -> list[str]:
    return {
        "colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES), "count": [str(c) for c in COUNTS],
    }[attribute]


def _place_item(rng: random.Random) -> tuple[str, str, str]:
    """(note, question, answer) answerable from the note alone."""
    place = rng.choice(PLACES)
    return place_note(place), rng.choice(PLACE_QUESTIONS), place


def _mapping_item(scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    """(note, question, answer) needing both: the note's mapping and the image's colour."""
    other = rng.choice([c for c in COLOURS if c != scene.colour])
    colours = [scene.colour, other]
    rng.shuffle(colours)
    places = rng.sample(PLACES, 2)
    many = scene.count > 1
    slots = {"does": "do" if many else "does", "obj": "objects" if many else "object"}
    question = rng.choice(_ORIGIN_QUESTIONS).format(**slots)
    return mapping_note(list(zip(colours, places))), question, places[colours.index(scene.colour)]


def _first_turn(note: str | None, question: str) -> str:
    return f"<image>\n{NOTE_PREFIX}{note}\n{question}" if note else f"<image>\n{question}"


def _conversation(note: str | None, turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    """LLaVA turns; the image tag and the note go in the first human turn only."""
    conv = []
    for i, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": _first_turn(note, q) if i == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return conv


def without_note(record: dict) -> dict:
    """A deep copy of `record` with the note line dropped from its human turns and `note` set to None.

    The benchmark's "note absent" condition: the question and `<image>` tag stay as they are."""
    out = copy.deepcopy(record)
    for turn in out.get("conversations", []):
        if turn.get("from") == "human":
            lines = turn["value"].split("\n")
            turn["value"] = "\n".join(line for line in lines if not line.startswith(NOTE_PREFIX))
    out["note"] = None
    return out


def _test_records(i: int, rel: str, scene: Scene, rng: random.Random) -> list[dict]:
    """All items of one test scene; redundant/conflict items reuse the image item's phrasing,
    so the note is the only difference from the matching `image` item."""
    qas = questions(scene, rng)
    phrasing = {t: q for t, q, _ in qas}
    items = [("caption", "image", None, rng.choice(CAPTION_PROMPTS), caption(scene), None)]
    items += [(t, "image", None, q, a, None) for t, q, a in qas]
    note, q, a = _place_item(rng)
    items.append(("place", "note", note, q, a, None))
    attr = rng.choice(NOTE_ATTRIBUTES)
    truth = _truth(scene, attr)
    items.append((attr, "redundant", attribute_note(attr, truth, scene.count), phrasing[attr], truth, None))
    note, q, a = _mapping_item(scene, rng)
    items.append(("place", "complementary", note, q, a, None))
    if rng.random() < CONFLICT_RATE:
        attr = rng.choice(NOTE_ATTRIBUTES)
        truth = _truth(scene, attr)
        wrong = rng.choice([v for v in _values(attr) if v != truth])
        items.append((attr, "conflict", attribute_note(attr, wrong, scene.count), phrasing[attr], truth, wrong))
    records = []
    for qtype, evidence, note, q, a, note_answer in items:
        record = {
            "id": f"test-{i:05d}-{evidence}-{qtype}",
            "image": rel,
            "conversations": _conversation(note, [(q, a)]),
            "type": qtype,
            "evidence": evidence,
            "answers": [a],
            "note": note,
        }
        if note_answer is not None:
            record["note_answer"] = note_answer
        records.append(record)
    return records


def _train_record(split: str, i: int, rel: str, scene: Scene, rng: random.Random) -> dict:
    """One multi-turn record like synthetic.py's, plus a note of a random kind (or none). The question a
    note bears on is asked right after it, in the first turn, as in the test items: a tiny LM learns to
    read a note next to its question within a benchmark's budget, not one several turns back."""
    qas = questions(scene, rng)
    turns = [(rng.choice(CAPTION_PROMPTS), caption(scene))] + [(q, a) for _, q, a in qas]
    kind = rng.choice(TRAIN_NOTE_KINDS)
    note, first = None, None
    if kind == "place":
        note, q, a = _place_item(rng)
        first = (q, a)
    elif kind == "attribute":
        attr = rng.choice(NOTE_ATTRIBUTES)
        note = attribute_note(attr, _truth(scene, attr), scene.count)
        first = next((q, a) for t, q, a in qas if t == attr)
        turns.remove(first)
    elif kind == "mapping":
        note, q, a = _mapping_item(scene, rng)
        first = (q, a)
    rng.shuffle(turns)
    return {"id": f"{split}-{i:05d}", "image": rel, "conversations": _conversation(note, [first, *turns] if first else turns)}


def _write_split(out_dir: Path, split: str, n: int, image_size: int, seed: int, aspect: float) -> list[dict]:
    # String seeds hash deterministically (sha512), so each split is reproducible on its own.
    rng = random.Random(f"evidence:{seed}:{split}")
    samples: list[dict] = []
    for i in range(n):
        scene = random_scene(rng)
        rel = f"images/{split}_{i:05d}.png"
        render_scene(scene, image_size, rng, aspect).save(out_dir / rel)
        if split == "test":
            samples.extend(_test_records(i, rel, scene, rng))
        else:
            samples.append(_train_record(split, i, rel, scene, rng))
    return samples


def make_evidence_dataset(
    out_dir: str | Path,
    n_train: int,
    n_eval: int,
    n_test: int,
    image_size: int = 64,
    seed: int = 0,
    aspect: float = 1.0,
) -> dict[str, Path]:
    """Render images and write train/eval JSON (multi-turn, with notes) and per-question test JSON. `aspect`:
    width / height of every image (1: square; 2: wide, for aspect-ratio tests with tiling)."""
    return write_splits(out_dir, {"train": n_train, "eval": n_eval, "test": n_test},
                        lambda out, split, n: _write_split(out, split, n, image_size, seed, aspect))
