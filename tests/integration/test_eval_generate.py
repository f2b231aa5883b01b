"""`train.eval_generate`: the session run (tests/conftest.py `trained_run`, eval every 20 of 40 steps, first 15
of the 16 eval samples, 12 new tokens) answers its eval set by generation and logs VQA accuracy / CIDEr-D.

The logged figures must be what `vlm eval` says of the answers the run saved, and the answers at the
last step must be what `vlm predict` answers with `final/` on those 15 samples (same batches of 8).
"""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vlm.cli import main
from vlm.config import ConfigError, load_config
from vlm.eval.predict import evaluate_predictions, read_predictions
from vlm.train.eval_generate import check_eval_generate


def test_each_evaluation_logs_generation_metrics_that_vlm_eval_reproduces(trained_run, synthetic):
    summary = json.loads((trained_run / "train_summary.json").read_text())
    history = summary["eval_history"]
    assert [entry["step"] for entry in history] == [20, 40]
    for entry in history:
        answers = trained_run / "eval_predictions" / f"step-{entry['step']}.jsonl"
        first = [s["id"] for s in json.loads(synthetic["eval"].read_text())[:15]]
        assert list(read_predictions(answers)) == first
        scored = evaluate_predictions(answers, synthetic["eval"])
        assert entry["vqa_accuracy"] == pytest.approx(scored["vqa"]["accuracy"])
        assert entry["cider_d"] == pytest.approx(scored["caption"]["cider_d"])
        for name, per_type in scored["vqa"]["per_type"].items():
            assert entry[f"vqa_accuracy/{name}"] == pytest.approx(per_type["accuracy"])
    assert summary["eval_vqa_accuracy"] == history[-1]["vqa_accuracy"]
    assert "step 20: eval loss" in (trained_run / "captured.log").read_text()

    events = EventAccumulator(str(next(trained_run.rglob("events.out.tfevents.*")).parent)).Reload()
    logged = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in ("eval/vqa_accuracy", "eval/cider_d")}
    assert logged["eval/vqa_accuracy"] == pytest.approx({e["step"]: e["vqa_accuracy"] for e in history})
    assert logged["eval/cider_d"] == pytest.approx({e["step"]: e["cider_d"] for e in history})


def test_answers_at_the_last_step_are_vlm_predicts(trained_run, synthetic, tmp_path):
    first = tmp_path / "eval-first-15.json"
    first.write_text(json.dumps(json.loads(synthetic["eval"].read_text())[:15]))
    out = tmp_path / "preds.jsonl"
    assert main(["predict", "--model", str(trained_run / "final"), "--data", str(first),
                 "--image-root", str(synthetic["eval"].parent), "--out", str(out), "--max-new-tokens", "12",
                 "--batch-size", "8"]) == 0
    during_training = read_predictions(trained_run / "eval_predictions" / "step-40.jsonl")
    assert during_training == read_predictions(out)
    assert any(during_training.values()), during_training


def test_eval_generate_needs_an_eval_set_and_a_replicated_model(tmp_path):
    config = load_config(None, ["train.eval_generate=true", "data.train_files=[x.json]"])
    with pytest.raises(ConfigError, match="train.eval_generate needs an eval set; set data.eval_files"):
        check_eval_generate(config, "single")
    config = load_config(None, ["train.eval_generate=true", "data.eval_files=[x.json]"])
    check_eval_generate(config, "ddp")
    with pytest.raises(ConfigError, match="not supported with train.strategy=zero3"):
        check_eval_generate(config, "zero3")
    with pytest.raises(ConfigError, match="train.eval_generate_samples must be >= 1"):
        load_config(None, ["train.eval_generate_samples=0"])
