"""Training on hostile data finishes and counts every bad sample; a batch that cannot be loaded at all
is skipped at weight 0; nothing loadable stops the run before step 1 in one line."""

import json

from hostile import HOSTILE_RECORDS, QA, write_hostile_json, write_images
from vlm.cli import main
from vlm.config import load_config


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
