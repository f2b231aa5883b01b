"""Train the tiny VLM for a few dozen steps through the real entry points; the loss must fall."""

import json
import re

import pytest

from vlm.cli import main
from vlm.model import VLM


@pytest.fixture(scope="module")
def trained(trained_run):
    """The session's 40-step run (tests/conftest.py), shared with the lmms-eval tests."""
    return trained_run


def test_loss_falls_substantially(trained):
    summary = json.loads((trained / "train_summary.json").read_text())
    assert summary["steps"] == 40
    assert summary["final_loss"] < 0.5 * summary["first_loss"], summary
    assert summary["eval_loss"] < summary["first_loss"]
    assert list(trained.rglob("events.out.tfevents.*")), "TensorBoard logs are written by default"


def test_log_outside_a_terminal_has_a_few_progress_lines_not_a_bar_per_step(trained):
    log = (trained / "captured.log").read_text()
    summary = json.loads((trained / "train_summary.json").read_text())
    assert "\r" not in log, "no tqdm redraws in a captured log"
    progress = [line for line in log.splitlines() if line.startswith("train ")]
    steps = [int(re.match(r"train (\d+)/40 ", line).group(1)) for line in progress]
    # train.log_every (10) steps apart, plus the first step and one line per 30 s of a slow machine.
    assert {1, 10, 20, 30, 40} <= set(steps), log
    assert len(progress) <= 5 + summary["train_seconds"] // 30, log
    for line in progress:
        assert re.search(r"loss=\d+\.\d{4} lr=\d\.\d\de[+-]\d\d tok_s=\d+ \| [\d.]+ step/s, elapsed ", line), line
    assert "step 20: eval loss" in log


def test_final_model_predicts_and_evaluates(trained, synthetic, capsys):
    assert VLM.from_pretrained(trained / "final").fusion.tokens_per_image > 0
    preds = trained / "preds.jsonl"
    assert main(["predict", "--model", str(trained / "final"), "--data", str(synthetic["test"]),
                 "--out", str(preds), "--max-new-tokens", "12", "--batch-size", "8"]) == 0
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    expected_ids = {s["id"] for s in json.loads(synthetic["test"].read_text())}
    assert {line["id"] for line in lines} == expected_ids
    capsys.readouterr()
    assert main(["eval", "--predictions", str(preds), "--data", str(synthetic["test"])]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["num_samples"] == len(expected_ids)
    assert 0.0 <= metrics["vqa"]["accuracy"] <= 1.0
    assert set(metrics["vqa"]["per_type"]) >= {"colour", "shape", "size", "count"}
    assert "cider_d" in metrics["caption"]


def test_bad_config_key_is_reported_by_the_cli(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  max_step: 3\n")
    assert main(["train", str(config)]) == 2
    assert "Unknown config key 'train.max_step'" in capsys.readouterr().err
