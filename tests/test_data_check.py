import json

from PIL import Image

from vlm.cli import main


def write_data(tmp_path):
    Image.new("RGB", (64, 64), (20, 200, 20)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG broken")
    turn = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    records = [
        {"id": "good-1", "image": "ok.png", "conversations": turn("<image>\nColour?", "green")},
        {"id": "good-2", "conversations": turn("No image here.", "fine")},
        {"id": "missing", "image": "nope.png", "conversations": turn("<image>\nColour?", "green")},
        {"id": "corrupt", "image": "corrupt.png", "conversations": turn("<image>\nColour?", "green")},
        {"id": "two-tags", "image": "ok.png", "conversations": turn("<image><image>", "x")},
        {"id": "leaky", "image": "ok.png", "conversations": turn("<image>", "see <image>")},
        {"id": "long", "image": "ok.png", "conversations": turn("<image>\n" + "word " * 300, "x")},
    ]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    return path


def test_report_names_every_bad_sample_by_category(tmp_path, backbones, capsys):
    data = write_data(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(f"model:\n  vision: {backbones['vit']}\n  lm: {backbones['lm']}\ndata:\n  max_length: 200\n")
    assert main(["data", "check", str(data), "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "samples: 7 (2 good, 5 bad)" in out
    assert "formats: llava 7" in out
    assert "PROBLEM missing_image: 1 sample(s): missing" in out
    assert "PROBLEM corrupt_image: 1 sample(s): corrupt" in out
    assert "PROBLEM image_tag_mismatch: 1 sample(s): two-tags" in out
    assert "PROBLEM image_in_answer: 1 sample(s): leaky" in out
    assert "PROBLEM too_long: 1 sample(s): long" in out and "data.max_length=200" in out
    assert "tokens per sample (image tokens included): min" in out


def test_clean_data_passes_without_a_config(tmp_path, capsys):
    data = write_data(tmp_path)
    records = [r for r in json.loads(data.read_text()) if r["id"].startswith("good")]
    data.write_text(json.dumps(records))
    assert main(["data", "check", str(data)]) == 0
    assert "samples: 2 (2 good, 0 bad)" in capsys.readouterr().out
