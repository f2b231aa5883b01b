"""Hostile data: nothing may raise out of the readers; bad samples are named (id and reason) and
skipped, unusual-but-valid images are used. Builders in tests/hostile.py."""

import json
import sys

import pytest
from PIL import Image

from hostile import HOSTILE_RECORDS, TEXT_QA, problems_by_id, write_hostile_json, write_images
from vlm.cli import main
from vlm.config import ConfigError, load_config
from vlm.data.check import check_data
from vlm.data.formats import read_samples
from vlm.data.images import load_images
from vlm.data.sample import DataError, Sample, SampleError


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
            from vlm.data.validation import check_sample

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
