"""Early stopping on the eval loss (train.early_stopping_patience) and the `on_step` hook, on the tiny VLM.

With lr=1e-9 the eval loss cannot improve by min_delta=0.01, so with eval_every=2 and patience=2 the
run stops at step 6: the eval at step 2 sets the best, those at 4 and 6 do not improve on it."""

from __future__ import annotations

import json
import logging

import pytest

from vlm.cli import main
from vlm.config import load_config
from vlm.train import train
from vlm.train.checkpoint import list_checkpoints


@pytest.fixture()
def config_file(backbones, synthetic, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(f"""
model: {{vision: {backbones['vit']}, lm: {backbones['lm']}, projector: {{type: mlp2x_gelu}}}}
data: {{train_files: [{synthetic['train']}], eval_files: [{synthetic['eval']}]}}
train: {{stage: align, batch_size: 4, lr: 1.0e-9, eval_every: 2, early_stopping_min_delta: 0.01, report_to: none}}
""")
    return path


def test_run_stops_when_the_eval_loss_stops_improving(config_file, tmp_path, caplog):
    out, seen = tmp_path / "run", []
    caplog.set_level(logging.INFO, logger="vlm.train.loop")
    config = load_config(config_file, ["train.max_steps=50", "train.early_stopping_patience=2", f"output_dir={out}"])
    summary = train(config, on_step=lambda trainer: seen.append((trainer.state.step, len(trainer.state.eval_history))))

    assert summary["steps"] == 6 and summary["stopped_early"] is True
    assert seen == [(1, 0), (2, 1), (3, 1), (4, 2), (5, 2), (6, 3)]  # once per step, after that step's eval
    assert (out / "final" / "config.json").is_file()
    saved = json.loads((out / "train_summary.json").read_text())
    assert [e["step"] for e in saved["eval_history"]] == [2, 4, 6]  # the final eval reuses step 6's
    losses = [e["loss"] for e in saved["eval_history"]]
    assert max(losses) - min(losses) < 0.01
    assert saved["stopped_early"] is True and saved["eval_loss"] == losses[-1]
    assert saved["best_eval_loss"] == min(losses)
    assert saved["best_eval_step"] == saved["eval_history"][losses.index(min(losses))]["step"]
    assert summary["eval_history"] == saved["eval_history"]
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Early stopping")]
    assert line.startswith("Early stopping at step 6: eval loss has not improved for 2 evaluations (best ")


def test_without_patience_the_same_run_reaches_max_steps(config_file, tmp_path):
    out, seen = tmp_path / "run", []
    summary = train(load_config(config_file, ["train.max_steps=10", f"output_dir={out}"]),
                    on_step=lambda trainer: seen.append(trainer.state.step))
    assert summary["steps"] == 10 and summary["stopped_early"] is False
    assert seen == list(range(1, 11))
    assert [e["step"] for e in summary["eval_history"]] == [2, 4, 6, 8, 10]
    assert (out / "final").is_dir()


def test_a_resumed_run_keeps_counting(config_file, tmp_path):
    """Resumed from checkpoint-4 (evals at 2 and 4, one without improvement), the run stops at step 6 as
    the uninterrupted one did, not at step 10 as a fresh count would."""
    out = tmp_path / "run"
    common = ["train.max_steps=50", "train.early_stopping_patience=2", "train.save_every=4", f"output_dir={out}"]
    first = train(load_config(config_file, common))
    assert first["steps"] == 6 and [p.name for p in list_checkpoints(out)] == ["checkpoint-4"]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["eval_history"]] == [2, 4]
    resumed = train(load_config(config_file, [*common, f"train.resume_from={out / 'checkpoint-4'}"]))
    assert resumed["steps"] == 6 and resumed["stopped_early"] is True
    assert resumed["eval_history"] == first["eval_history"]


def test_patience_without_eval_files_is_a_one_line_config_error(backbones, synthetic, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(f"""
model: {{vision: {backbones['vit']}, lm: {backbones['lm']}}}
data: {{train_files: [{synthetic['train']}]}}
train: {{eval_every: 2, early_stopping_patience: 3, report_to: none}}
output_dir: {tmp_path / 'run'}
""")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("Config error: train.early_stopping_patience=3 needs an eval set; set data.eval_files "
                       "(or train.early_stopping_patience=0).")
    assert not (tmp_path / "run").exists()  # stopped before anything was built or written


def evals(*losses: float) -> list[dict]:
    return [{"step": 10 * (i + 1), "loss": loss} for i, loss in enumerate(losses)]


def test_eval_progress_counts_like_transformers():
    from vlm.train.early_stopping import eval_progress

    p = eval_progress([], 0.0)
    assert (p.best_step, p.best_loss, p.waited) == (None, None, 0)
    p = eval_progress(evals(2.0, 1.5, 1.6, 1.55), 0.0)
    assert (p.best_step, p.best_loss, p.waited) == (20, 1.5, 2)
    p = eval_progress(evals(2.0, 1.995, 1.99, 1.5), 0.01)  # small gains count as no improvement, but are the best
    assert (p.best_step, p.best_loss, p.waited) == (40, 1.5, 0)
    p = eval_progress(evals(2.0, 1.995, 1.99), 0.01)
    assert (p.best_step, p.best_loss, p.waited) == (30, 1.99, 2)
    p = eval_progress(evals(float("nan"), 3.0, float("inf")), 0.0)  # a non-finite loss never improves
    assert (p.best_step, p.best_loss, p.waited) == (20, 3.0, 1)
