"""The evidence-bearing synthetic data must label each question with where its answer really is.

Truth is re-derived here on its own terms (note text parsed with local regexes, the scene's colour
read from the pixels, the rest from the caption), not with the generator's helpers.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm.data.formats import read_samples
from vlm.embedded.evidence import NOTE_PREFIX, PLACES, make_evidence_dataset, without_note
from vlm.embedded.synthetic import COLOURS

WORDS = {"one": "1", "two": "2", "three": "3"}
PLACE_NOTE = re.compile(r"the picture was taken at the (\w+)\.")
MAPPING_NOTE = re.compile(r"(\w+) objects come from the (\w+) and (\w+) objects come from the (\w+)\.")
CAPTION = re.compile(r"(a|two|three) (small|large) (\w+) (\w+?)s?( on the \w+| at the \w+)?\.")


def attribute_note(note: str) -> tuple[str, str, bool] | None:
    """(attribute, value, plural grammar?) stated by an attribute note, or None."""
    if m := re.fullmatch(r"there (is|are) (one|two|three) objects?\.", note):
        return "count", WORDS[m[2]], m[1] == "are"
    if m := re.fullmatch(r"the shape is a (\w+)\.|the shapes are (\w+)s\.", note):
        return "shape", m[1] or m[2], m[2] is not None
    if m := re.fullmatch(r"the objects? (is|are) (\w+)\.", note):
        return ("size" if m[2] in ("small", "large") else "colour"), m[2], m[1] == "are"
    return None


def caption_truth(text: str) -> dict[str, str]:
    m = CAPTION.fullmatch(text)
    assert m, text
    return {"count": {"a": "1", **WORDS}[m[1]], "size": m[2], "colour": m[3], "shape": m[4]}


def pixel_colour(path: Path) -> str:
    """The palette colour nearest the saturated (object) pixels: the image's own truth."""
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    obj = a[(a.max(-1) - a.min(-1)) > 60]
    assert len(obj), path
    mean = obj.mean(0)
    return min(COLOURS, key=lambda c: float(((np.array(COLOURS[c]) - mean) ** 2).sum()))


def split_note(human: str) -> tuple[str | None, str]:
    """(note, question) of a first human turn."""
    assert human.startswith("<image>\n"), human
    rest = human[len("<image>\n"):]
    if rest.startswith(NOTE_PREFIX):
        note, question = rest[len(NOTE_PREFIX):].split("\n", 1)
        return note, question
    return None, rest


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evidence")
    make_evidence_dataset(out, n_train=200, n_eval=8, n_test=40, image_size=64, seed=3)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        make_evidence_dataset(tmp_path / name, n_train=6, n_eval=2, n_test=6, seed=seed)
        runs[name] = _files(tmp_path / name)
    assert runs["a"] == runs["b"]
    assert set(runs["a"]) == set(runs["c"])
    for name in ("train.json", "test.json", "images/test_00000.png"):
        assert runs["a"][name] != runs["c"][name], name


def test_evidence_labels_match_the_scene(data):
    records = json.loads((data / "test.json").read_text())
    assert len({r["id"] for r in records}) == len(records)
    scenes: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        scenes[r["image"]].append(r)
    seen = Counter(r["evidence"] for r in records)
    assert seen["note"] == seen["redundant"] == seen["complementary"] == len(scenes) == 40
    assert 3 <= seen["conflict"] <= 20, seen  # about 1 in 4 scenes
    places_used = set()
    for image, items in scenes.items():
        assert all(it["type"] != "place" or it["evidence"] in ("note", "complementary") for it in items)
        plain = {it["type"]: it["answers"][0] for it in items if it["evidence"] == "image"}
        truth = caption_truth(plain["caption"])
        assert truth["colour"] == pixel_colour(data / image)
        assert {t: plain[t] for t in truth} == truth  # image questions agree with the caption and pixels
        plural = truth["count"] != "1"
        for it in items:
            human, gpt = it["conversations"][0]["value"], it["conversations"][1]["value"]
            note, question = split_note(human)
            assert len(it["conversations"]) == 2 and it["answers"] == [gpt]
            assert note == it["note"]
            ev = it["evidence"]
            if ev == "image":
                assert note is None
                continue
            assert note is not None
            if ev == "note":
                m = PLACE_NOTE.fullmatch(note)
                assert m and m[1] in PLACES and gpt == m[1]
                assert "picture" in question or "photo" in question
                places_used.add(m[1])
            elif ev == "complementary":
                m = MAPPING_NOTE.fullmatch(note)
                assert m, note
                (c1, p1), (c2, p2) = (m[1], m[2]), (m[3], m[4])
                assert c1 != c2 and p1 != p2 and {c1, c2} <= set(COLOURS) and {p1, p2} <= set(PLACES)
                assert truth["colour"] in (c1, c2)
                assert gpt == (p1 if c1 == truth["colour"] else p2)
                assert "come" in question
            else:
                stated = attribute_note(note)
                assert stated, note
                attr, value, note_plural = stated
                assert it["type"] == attr
                if attr != "count":
                    assert note_plural == plural, note
                else:
                    assert note_plural == (value != "1"), note
                assert question == next(i for i in items if i["evidence"] == "image" and i["type"] == attr)[
                    "conversations"][0]["value"].split("\n", 1)[1]
                if ev == "redundant":
                    assert value == gpt == truth[attr] and "note_answer" not in it
                else:
                    assert ev == "conflict"
                    assert gpt == truth[attr] and it["note_answer"] == value != gpt
    assert len(places_used) > 1


def test_without_note_drops_exactly_the_note_line(data):
    records = json.loads((data / "test.json").read_text())
    for r in records:
        before = json.dumps(r)
        stripped = without_note(r)
        assert json.dumps(r) == before  # the original is untouched
        assert stripped["note"] is None
        human = stripped["conversations"][0]["value"]
        if r["note"] is None:
            assert stripped["conversations"] == r["conversations"]
        else:
            original = r["conversations"][0]["value"]
            assert human == original.replace(f"{NOTE_PREFIX}{r['note']}\n", "") != original
            assert human == "<image>\n" + split_note(original)[1]
        assert NOTE_PREFIX not in human and human.startswith("<image>\n")
        assert stripped["conversations"][1:] == r["conversations"][1:]
        assert stripped["answers"] == r["answers"]


def test_train_notes_fractions_and_placement(data):
    records = json.loads((data / "train.json").read_text())
    kinds = Counter()
    for r in records:
        conv = r["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert all(NOTE_PREFIX not in t["value"] and "<image>" not in t["value"] for t in conv[1:])
        note, _ = split_note(conv[0]["value"])
        cap = next(conv[i + 1]["value"] for i in range(0, len(conv), 2) if CAPTION.fullmatch(conv[i + 1]["value"]))
        truth = caption_truth(cap)
        answers = [conv[i + 1]["value"] for i in range(0, len(conv), 2)]
        if note is None:
            kinds["none"] += 1
            assert not set(answers) & set(PLACES)
        elif m := PLACE_NOTE.fullmatch(note):
            kinds["place"] += 1
            assert m[1] in answers and len(conv) == 14 - 2 * (truth["count"] != "1")
        elif m := MAPPING_NOTE.fullmatch(note):
            kinds["mapping"] += 1
            assert truth["colour"] in (m[1], m[3])
            assert (m[2] if m[1] == truth["colour"] else m[4]) in answers
        else:
            stated = attribute_note(note)
            assert stated, note
            kinds["attribute"] += 1
            assert stated[1] == truth[stated[0]]  # redundant only: no conflicting notes in training
            assert not set(answers) & set(PLACES)
    assert set(kinds) == {"none", "place", "attribute", "mapping"}
    for kind, n in kinds.items():
        assert 0.12 * len(records) <= n <= 0.40 * len(records), kinds


@pytest.mark.parametrize("split", ["train", "eval", "test"])
def test_repo_reader_accepts_every_record(data, split):
    path = data / f"{split}.json"
    samples, problems = read_samples(path, image_root=None)
    assert problems == []
    assert len(samples) == len(json.loads(path.read_text())) > 0
    assert all(Path(s.images[0]).is_file() for s in samples)
