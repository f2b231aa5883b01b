"""Shared hostile-data builders: every JSON shape where a sample, conversation, turn or image belongs,
and image files that are empty, truncated, folders, bombs or merely unusual (used by the unit tests of
the readers and the integration tests that train on them)."""

import json
import struct
import zlib

from PIL import Image

QA = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "green"}]
TEXT_QA = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "hello"}]

# (id, record, category): the id is the record's own or, where it has no usable one, its position
HOSTILE_RECORDS = [
    ("conv-string", {"conversations": "human: hi"}, "malformed"),
    ("conv-number", {"conversations": 5}, "malformed"),
    ("conv-object", {"conversations": {"from": "human", "value": "hi"}}, "malformed"),
    ("turns-as-lists", {"conversations": [["human", "hi"], ["gpt", "hello"]]}, "malformed"),
    ("turns-as-strings", {"conversations": ["hi", "hello"]}, "malformed"),
    ("turn-null", {"conversations": [None, TEXT_QA[1]]}, "malformed"),
    ("speaker-list", {"conversations": [{"from": ["human"], "value": "hi"}, TEXT_QA[1]]}, "malformed"),
    ("speaker-unknown", {"conversations": [{"from": "robot", "value": "hi"}, TEXT_QA[1]]}, "malformed"),
    ("value-object", {"conversations": [{"from": "human", "value": {"text": "hi"}}, TEXT_QA[1]]}, "malformed"),
    ("value-list", {"conversations": [TEXT_QA[0], {"from": "gpt", "value": ["hello"]}]}, "malformed"),
    ("value-bool", {"conversations": [TEXT_QA[0], {"from": "gpt", "value": True}]}, "malformed"),
    ("value-null", {"conversations": [TEXT_QA[0], {"from": "gpt", "value": None}]}, "empty_turn"),
    ("value-missing", {"conversations": [TEXT_QA[0], {"from": "gpt"}]}, "empty_turn"),
    ("conv-empty", {"conversations": []}, "empty"),
    ("no-answer", {"conversations": [TEXT_QA[0]]}, "no_answer"),
    ("msgs-string", {"messages": "user: hi"}, "malformed"),
    ("msgs-lists", {"messages": [["user", "hi"]]}, "malformed"),
    ("content-object", {"messages": [{"role": "user", "content": {"type": "text", "text": "hi"}}]}, "malformed"),
    ("part-string", {"messages": [{"role": "user", "content": ["hi"]}]}, "malformed"),
    ("part-text-list", {"messages": [{"role": "user", "content": [{"type": "text", "text": ["hi"]}]}]}, "malformed"),
    ("role-list", {"messages": [{"role": ["user"], "content": "hi"}, {"role": "assistant", "content": "x"}]},
     "malformed"),
    ("msgs-no-answer", {"messages": [{"role": "user", "content": "hi"}]}, "no_answer"),
    ("image-number", {"image": 5, "conversations": QA}, "malformed"),
    ("image-bool", {"image": True, "conversations": QA}, "malformed"),
    ("image-null-in-list", {"images": [None], "conversations": QA}, "malformed"),
    ("image-nested-list", {"images": [["ok.png"]], "conversations": QA}, "malformed"),
    ("image-empty-object", {"image": {}, "conversations": QA}, "malformed"),
    ("caption-list", {"image": "ok.png", "caption": ["a", "b"]}, "malformed"),
    ("caption-object", {"image": "ok.png", "caption": {"en": "a"}}, "malformed"),
    ("answers-broken-json", {"image": "ok.png", "question": "Colour?", "answers": "[\"green\""}, "malformed"),
    ("answer-object", {"image": "ok.png", "question": "Colour?", "answer": {"en": "green"}}, "malformed"),
    ("question-list", {"image": "ok.png", "question": ["Colour?"], "answer": "green"}, "malformed"),
    ("no-known-keys", {"text": "hello"}, "malformed"),
]
NON_OBJECTS = [None, 3, "a string", [], [QA]]  # whole records that are not objects: named by position


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares `width` x `height` (a decompression bomb's shape, without the bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def write_images(root):
    """Unusual but valid images (must be used) and hostile ones (must be named); returns both name lists."""
    Image.new("RGB", (64, 64), (20, 200, 20)).save(root / "ok.png")
    Image.new("I;16", (16, 16), 32768).save(root / "sixteen-bit.png")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    Image.new("P", (16, 16), 3).save(root / "palette.png")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(root / "one-pixel.png")
    Image.new("RGB", (3000, 12), (0, 0, 255)).save(root / "wide.png")
    (root / "empty.png").write_bytes(b"")
    (root / "truncated.png").write_bytes((root / "ok.png").read_bytes()[:60])
    (root / "folder.png").mkdir()
    (root / "bomb.png").write_bytes(png_header(100_000, 100_000))  # over Pillow's own limit
    (root / "large.png").write_bytes(png_header(3000, 3000))  # over the data.max_image_pixels the tests set
    unusual = ["sixteen-bit.png", "cmyk.jpg", "palette.png", "one-pixel.png", "wide.png"]
    hostile = {"empty.png": "corrupt_image", "truncated.png": "corrupt_image", "folder.png": "missing_image",
               "bomb.png": "image_too_large", "large.png": "image_too_large", "absent.png": "missing_image"}
    return unusual, hostile


def write_hostile_json(root, n_good: int = 0) -> tuple:
    unusual, hostile = write_images(root)
    records = [{"id": f"good-{i}", "image": "ok.png", "conversations": QA} for i in range(n_good)]
    records += [{"id": f"unusual-{name}", "image": name, "conversations": QA} for name in unusual]
    records += [{"id": f"hostile-{name}", "image": name, "conversations": QA} for name in hostile]
    records += [{"id": sid, **record} for sid, record, _ in HOSTILE_RECORDS]
    first_non_object = len(records)
    records += NON_OBJECTS
    path = root / "hostile.json"
    path.write_text(json.dumps(records))
    positions = [f"hostile.json:{first_non_object + k}" for k in range(len(NON_OBJECTS))]
    return path, unusual, hostile, positions


def problems_by_id(report) -> dict[str, str]:
    return {sid: category for category, ids in report.problems.items() for sid in ids}
