"""Hostile data: every JSON shape where a sample, conversation, turn or image belongs, and image files
that are empty, truncated, folders, bombs or merely unusual. Nothing may raise out of the readers or kill
a run: bad samples are named (id and reason) and skipped, unusual-but-valid images are used."""

import json
import struct
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from vlm.cli import main
from vlm.config import ConfigError, load_config
from vlm.data.check import check_data
from vlm.data.formats import read_samples
from vlm.data.images import load_images
from vlm.data.sample import DataError, Sample, SampleError

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


def test_every_hostile_record_and_image_is_named_and_the_unusual_images_pass(tmp_path):
    path, unusual, hostile, positions = write_hostile_json(tmp_path, n_good=1)
    report = check_data([path], data=load_config(None, ["data.max_image_pixels=1000000"]).data)
    found = problems_by_id(report)
    expected = {sid: category for sid, _, category in HOSTILE_RECORDS}
    expected.update({f"hostile-{name}": category for name, category in hostile.items()})
    expected.update({position: "malformed" for position in positions})
    assert found == expected
    total = 1 + len(unusual) + len(expected)
    assert f"samples: {total} ({1 + len(unusual)} good, {len(expected)} bad)" in report.render()
    out = report.render()
    for category in set(expected.values()):
        assert f"PROBLEM {category}: " in out


@pytest.mark.parametrize("sample_id, needle", [
    ("conv-string", "'conversations' is the string 'human: hi'; it must be a list of turns"),
    ("turns-as-lists", "'conversations' turn 0 is a list of 2; each turn must be an object"),
    ("value-object", "turn 0's 'value' is an object with keys text, not text"),
    ("no-answer", "has no assistant turn, so there is nothing to learn"),
    ("part-string", "message 0's 'content' part 0 is the string 'hi'"),
    ("hostile-folder.png", "is a folder, not an image file"),
    ("hostile-bomb.png", "is too large to decode safely"),
    ("hostile-large.png", "declares 3000x3000 = 9,000,000 pixels, over data.max_image_pixels=1,000,000"),
    ("hostile-truncated.png", "cannot be decoded"),
])
def test_the_reason_says_what_is_wrong(tmp_path, sample_id, needle):
    path, *_ = write_hostile_json(tmp_path)
    errors = {}
    samples, read_errors = read_samples(path)
    for err in read_errors:
        errors[err.sample_id] = str(err)
    for sample in samples:
        try:
            from vlm.data.checks import check_sample

            check_sample(sample, "<image>")
            load_images(sample, max_pixels=1_000_000)
        except SampleError as err:
            errors[sample.id] = str(err)
    assert needle in errors[sample_id]


def test_unusual_images_decode_to_sensible_rgb(tmp_path):
    unusual, _ = write_images(tmp_path)
    images = load_images(Sample("s", [], [str(tmp_path / name) for name in unusual]))
    assert [im.mode for im in images] == ["RGB"] * len(unusual)
    assert images[0].getpixel((0, 0)) == (128, 128, 128)  # 16-bit mid-grey stays mid-grey, not clipped to white
    assert images[3].size == (1, 1) and images[4].size == (3000, 12)


def test_a_limit_above_pillows_is_honoured_and_pillows_global_is_restored(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # stands in for Pillow's default
    Image.new("RGB", (200, 200)).save(tmp_path / "big.png")  # 40,000 pixels: Pillow alone would refuse it
    sample = Sample("s", [], [str(tmp_path / "big.png")])
    assert load_images(sample, max_pixels=100_000)[0].size == (200, 200)
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(SampleError) as err:
        load_images(sample, max_pixels=1000)
    assert err.value.category == "image_too_large"


def test_numbers_where_text_belongs_are_used_and_counted(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    records = [{"id": "count", "image": "ok.png", "question": "How many?", "answer": 2},
               {"id": "year", "image": "ok.png", "caption": 1999},
               {"id": "turn", "conversations": [TEXT_QA[0], {"from": "gpt", "value": 7}]},
               {"id": "plain", "conversations": TEXT_QA}]
    (tmp_path / "numbers.json").write_text(json.dumps(records))
    samples, errors = read_samples(tmp_path / "numbers.json")
    assert not errors and [s.messages[-1]["content"] for s in samples] == ["2", "1999", "7", "hello"]
    out = check_data([tmp_path / "numbers.json"]).render()
    assert "samples: 4 (4 good, 0 bad)" in out
    assert "NOTE coerced: 3 sample(s) have a number where text belongs, used as text: count, year, turn" in out
    assert "answer 0 is the number 2" in out


def test_invalid_json_names_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"id": "a", "caption": "x"},\n  {"id": "b",, "caption": "y"}\n]')
    with pytest.raises(DataError, match=r"'.*bad.json' is not valid JSON: Expecting property name .* line 3, column 14"):
        read_samples(bad)
    lines = tmp_path / "lines.json"
    lines.write_text('{"id": "a", "caption": "x"}\n{"id": "b", "caption": "y"}\n')
    with pytest.raises(DataError, match=r"Extra data at line 2, column 1\. .*name it \.jsonl"):
        read_samples(lines)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'[\n{"caption": "caf\xe9"}]')
    with pytest.raises(DataError, match="is not UTF-8 text .*line 2"):
        read_samples(latin)
    assert main(["data", "check", str(bad), str(lines)]) == 1
    out = capsys.readouterr().out
    assert "FILE ERROR Data file" in out and "line 3, column 14" in out and "Traceback" not in out


def test_deepspeed_strategies_without_deepspeed_say_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed now fails as if not installed
    config = tmp_path / "config.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\ntrain:\n  strategy: zero3\n")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert 'Config error: train.strategy=zero3 needs DeepSpeed, but DeepSpeed is not installed; install it with ' \
           '`pip install -e ".[deepspeed]"`' in err


def test_max_image_pixels_must_be_positive():
    assert load_config(None, ["data.max_image_pixels=null"]).data.max_image_pixels is None
    with pytest.raises(ConfigError, match="data.max_image_pixels must be a positive"):
        load_config(None, ["data.max_image_pixels=0"])


def test_training_on_hostile_data_finishes_and_counts_every_bad_sample(tmp_path, backbones, capsys):
    """12 usable samples (7 plain, the 5 unusual images), 4 whose images fail only when loaded, and every other
    hostile one dropped up front: 4 steps of 4 read the whole epoch, so every bad sample is met and counted."""
    from vlm.train import train

    path, unusual, hostile, positions = write_hostile_json(tmp_path, n_good=7)
    overrides = [f"model.vision={backbones['vit']}", f"model.lm={backbones['lm']}", f"data.train_files=[{path}]",
                 "data.max_image_pixels=1000000", "train.max_steps=4", "train.batch_size=4", "train.seed=3",
                 "train.report_to=[]", "train.stage=align", f"output_dir={tmp_path / 'run'}"]
    summary = train(load_config(None, overrides))
    assert summary["steps"] == 4 and summary["final_loss"] == summary["final_loss"]  # finished, finite loss
    skipped = json.loads((tmp_path / "run" / "train_summary.json").read_text())["skipped_samples"]
    expected: dict[str, int] = {}
    for category in [c for _, _, c in HOSTILE_RECORDS] + list(hostile.values()) + ["malformed"] * len(positions):
        expected[category] = expected.get(category, 0) + 1
    assert skipped == expected
    # data.strict: an image that only fails when opened still stops the run before step 1, in one line
    records = [{"id": f"good-{i}", "image": "ok.png", "conversations": QA} for i in range(7)]
    (tmp_path / "strict.json").write_text(json.dumps(records + [{"id": "the-bomb", "image": "bomb.png",
                                                                  "conversations": QA}]))
    config = tmp_path / "strict.yaml"
    config.write_text(f"model: {{vision: {backbones['vit']}, lm: {backbones['lm']}}}\n"
                      f"data: {{train_files: [{tmp_path / 'strict.json'}], strict: true}}\n"
                      f"train: {{report_to: none}}\noutput_dir: {tmp_path / 'strict'}\n")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Data error: sample 'the-bomb': image file" in err and "bomb.png" in err and "Traceback" not in err
    assert not (tmp_path / "strict" / "train_summary.json").exists()


def test_batches_whose_every_image_fails_to_load_are_skipped_not_fatal(tmp_path, backbones, capsys):
    """One loadable sample among 15 whose images fail only when decoded: most micro-batches (the first
    included, whatever the shuffle) have nothing to train on; the run still finishes. With none
    loadable, the run stops before step 1 in one line."""
    from vlm.train import train

    write_images(tmp_path)
    bad = [{"id": f"truncated-{i}", "image": "truncated.png", "conversations": QA} for i in range(15)]
    records = bad[:9] + [{"id": "the-good-one", "image": "ok.png", "conversations": QA}] + bad[9:]
    (tmp_path / "mostly-bad.json").write_text(json.dumps(records))
    overrides = [f"model.vision={backbones['vit']}", f"model.lm={backbones['lm']}", "train.max_steps=4",
                 f"data.train_files=[{tmp_path / 'mostly-bad.json'}]", "train.batch_size=4", "train.report_to=[]",
                 "train.stage=align", f"output_dir={tmp_path / 'run'}"]
    summary = train(load_config(None, overrides))
    assert summary["steps"] == 4 and summary["skipped_samples"] == {"corrupt_image": 15}, summary

    (tmp_path / "all-bad.json").write_text(json.dumps(bad))
    config = tmp_path / "all-bad.yaml"
    config.write_text(f"model: {{vision: {backbones['vit']}, lm: {backbones['lm']}}}\n"
                      f"data: {{train_files: [{tmp_path / 'all-bad.json'}]}}\n"
                      f"train: {{report_to: none}}\noutput_dir: {tmp_path / 'all-bad'}\n")
    capsys.readouterr()
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Data error: None of the 15 training samples could be loaded" in err and "Traceback" not in err
