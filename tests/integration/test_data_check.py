import json

import pytest
from PIL import Image

from vlm.cli import main
from vlm.config import DataConfig
from vlm.factory import processor_for


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


def write_planted(tmp_path):
    """The check fixture plus empty-turn and alternation-broken samples: one per problem category."""
    data = write_data(tmp_path)
    turn = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    records = json.loads(data.read_text()) + [
        {"id": "empty", "image": "ok.png", "conversations": turn("<image>\nColour?", "  ")},
        {"id": "alternation", "conversations": turn("Hi", "hello") + [{"from": "gpt", "value": "again"}]},
    ]
    data.write_text(json.dumps(records))
    return data


@pytest.mark.parametrize("workers", [1, 2])
def test_every_planted_category_is_found(tmp_path, backbones, capsys, workers):
    data = write_planted(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(f"model:\n  vision: {backbones['vit']}\n  lm: {backbones['lm']}\ndata:\n  max_length: 200\n")
    assert main(["data", "check", str(data), "--config", str(config), "--workers", str(workers)]) == 1
    out = capsys.readouterr().out
    assert "checked 9 samples in" in out and f"{workers} worker(s)" in out
    assert "samples: 9 (2 good, 7 bad)" in out
    for category, sample_id in [("missing_image", "missing"), ("corrupt_image", "corrupt"),
                                ("image_tag_mismatch", "two-tags"), ("image_in_answer", "leaky"),
                                ("too_long", "long"), ("empty_turn", "empty"), ("alternation", "alternation")]:
        assert f"PROBLEM {category}: 1 sample(s): {sample_id}" in out
    assert "images per sample: 0: 2, 1: 7" in out


def test_truncate_text_cuts_after_the_image_tokens(tmp_path, backbones, capsys):
    data = write_data(tmp_path)
    turn = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    records = [{"id": "long-caption", "image": "ok.png", "conversations": turn("<image>\nDescribe.", "word " * 300)},
               {"id": "long-question", "image": "ok.png", "conversations": turn("<image>\n" + "word " * 300, "x")}]
    data.write_text(json.dumps(records))
    config = tmp_path / "config.yaml"
    config.write_text(f"model:\n  vision: {backbones['vit']}\n  lm: {backbones['lm']}\n"
                      "data:\n  max_length: 200\n  truncate_text: true\n")
    assert main(["data", "check", str(data), "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "max 200" in out  # the long caption is cut to data.max_length and kept
    assert "PROBLEM too_long: 1 sample(s): long-question" in out and "no answer token is left" in out


def test_truncation_never_cuts_image_tokens(tiny_vlm, tmp_path):
    import pytest

    from vlm.loss import IGNORE_INDEX
    from vlm.data.sample import Sample, SampleError

    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    proc = processor_for(tiny_vlm)
    per_image = proc.tokens_per_image
    sample = Sample("s", [{"role": "user", "content": "<image>\n" + "word " * 50},
                          {"role": "assistant", "content": "yes " * 20}], [str(tmp_path / "a.png")])
    full = proc(sample)["input_ids"]
    item = processor_for(tiny_vlm, DataConfig(max_length=len(full) - 5, truncate_text=True))(sample)
    assert len(item["input_ids"]) == len(full) - 5
    assert int((item["input_ids"] == proc.image_token_id).sum()) == per_image
    assert (item["labels"] != IGNORE_INDEX).any()
    tight = processor_for(tiny_vlm, DataConfig(max_length=per_image, truncate_text=True))
    with pytest.raises(SampleError, match="image tokens alone") as err:  # image tokens are dropped, never cut
        tight(sample)
    assert err.value.category == "too_long"
    with pytest.raises(SampleError, match="data.truncate_text=true"):
        processor_for(tiny_vlm, DataConfig(max_length=per_image))(sample)


def test_length_grouped_sampler_is_deterministic_and_shards():
    from vlm.data.samplers import LengthGroupedSampler

    lengths = [(i * 37) % 101 for i in range(64)]
    one = LengthGroupedSampler(lengths, batch_size=4, seed=3, mega_batch_mult=4)
    order = list(one)
    assert sorted(order) == list(range(64)) and order == list(LengthGroupedSampler(lengths, 4, seed=3, mega_batch_mult=4))
    one.set_epoch(1)
    assert list(one) != order
    one.set_epoch(0)
    spread = [max(lengths[i] for i in order[k:k + 4]) - min(lengths[i] for i in order[k:k + 4]) for k in range(0, 64, 4)]
    assert sum(spread) / len(spread) < 101 / 4  # batches hold similar lengths
    ranks = [LengthGroupedSampler(lengths, 4, num_replicas=2, rank=r, seed=3, mega_batch_mult=4) for r in (0, 1)]
    shares = [list(r) for r in ranks]
    assert sorted(shares[0] + shares[1]) == list(range(64)) and len(shares[0]) == len(ranks[0]) == 32
    # step k on both ranks together is the k-th global batch of 2 x 4
    assert set(shares[0][:4] + shares[1][:4]) == set(LengthGroupedSampler(lengths, 8, seed=3, mega_batch_mult=4).global_order()[:8])
    ranks[1].set_position(0, 8)
    assert list(ranks[1]) == shares[1][8:]


def test_training_on_planted_bad_samples_completes_and_counts(tmp_path, backbones):
    from vlm.config import load_config
    from vlm.train import train

    data = write_planted(tmp_path)
    config = load_config(None, [
        f"model.vision={backbones['vit']}", f"model.lm={backbones['lm']}", f"data.train_files=[{data}]",
        "data.max_length=200", "train.max_steps=2", "train.batch_size=2", "train.report_to=none",
        "train.stage=align", f"output_dir={tmp_path / 'run'}",
    ])
    summary = train(config)
    assert summary["steps"] == 2
    saved = json.loads((tmp_path / "run" / "train_summary.json").read_text())["skipped_samples"]
    assert saved == {"missing_image": 1, "corrupt_image": 1, "image_tag_mismatch": 1, "image_in_answer": 1,
                     "too_long": 1, "empty_turn": 1, "alternation": 1}
