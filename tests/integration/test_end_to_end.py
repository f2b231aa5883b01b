"""Train the tiny VLM for a few dozen steps through the real entry points; the loss must fall."""

import json
import re
from pathlib import Path

import pytest

from captions import PROJECTOR, write_questions_file
from shapes import projector_tokens
from vlm.cli import main
from vlm.eval.metrics import normalize_vqa_answer
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


def _predict_and_eval(model: Path, data: Path, out: Path, capsys) -> tuple[dict[str, str], dict]:
    """`vlm predict` then `vlm eval`, as a user runs them: (predictions by id, the printed metrics)."""
    assert main(["predict", "--model", str(model), "--data", str(data), "--out", str(out),
                 "--max-new-tokens", "32", "--batch-size", "8"]) == 0
    capsys.readouterr()
    assert main(["eval", "--predictions", str(out), "--data", str(data)]) == 0
    predictions = {r["id"]: r["prediction"] for r in map(json.loads, out.read_text().splitlines())}
    return predictions, json.loads(capsys.readouterr().out)


def test_final_model_predicts_and_evaluates(trained, backbones, synthetic, capsys):
    """40 steps teach the answer format, not the images: this model answers 'small' to almost every
    question (measured: VQA accuracy 2/35 = 0.057, the size questions whose answer is small). So the
    figures checked are the ones `vlm eval` must get right whatever the model knows; the accuracy floor
    is on a model that learnt its images (the next test)."""
    # The ViT's 8x8 patch grid (64-px images, 8-px patches); pixel_shuffle folds each 2x2 block: 16.
    assert VLM.from_pretrained(trained / "final").fusion.tokens_per_image == projector_tokens(backbones["vit"], 2) == 16
    predictions, metrics = _predict_and_eval(trained / "final", synthetic["test"], trained / "preds.jsonl", capsys)
    samples = json.loads(synthetic["test"].read_text())
    assert set(predictions) == {s["id"] for s in samples}
    questions = [s for s in samples if s["type"] != "caption"]
    right = [normalize_vqa_answer(predictions[s["id"]]) == normalize_vqa_answer(s["conversations"][-1]["value"])
             for s in questions]
    assert metrics["num_samples"] == len(samples) and metrics["vqa"]["count"] == len(questions)
    assert metrics["vqa"]["accuracy"] == pytest.approx(sum(right) / len(questions))
    per_type = {name: entry["count"] for name, entry in metrics["vqa"]["per_type"].items()}
    assert per_type == {t: sum(s["type"] == t for s in questions) for t in {s["type"] for s in questions}}
    assert metrics["caption"]["count"] == len(samples) - len(questions)


def test_a_model_that_learnt_its_scenes_scores_high_under_vlm_eval(train_captioner, captions_file, tmp_path, capsys):
    """The session's 120-step caption model (projector; tests/captions.py) asked its eight scenes' colour
    and caption: measured VQA accuracy 1.0 (8/8) and BLEU-4 1.0 (every caption exact). A model that lost
    the image answers one colour for all eight: 2/8 at best (two scenes share each of red and blue)."""
    questions = write_questions_file(captions_file, tmp_path / "questions.json")
    _, metrics = _predict_and_eval(train_captioner(PROJECTOR) / "final", questions, tmp_path / "preds.jsonl", capsys)
    assert (metrics["vqa"]["count"], metrics["caption"]["count"]) == (8, 8)
    assert metrics["vqa"]["accuracy"] >= 0.75, metrics
    assert metrics["caption"]["bleu4"] >= 0.8, metrics


def test_bad_config_key_is_reported_by_the_cli(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  max_step: 3\n")
    assert main(["train", str(config)]) == 2
    assert "Unknown config key 'train.max_step'" in capsys.readouterr().err
