"""One process: exact resume after `kill -9`, NaN steps skipped without an update, abort after too many."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from vlm.config import load_config
from vlm.model import VLM
from vlm.train import train
from vlm.train.checkpoint import list_checkpoints
from vlm.train.loop import TrainingAborted

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def config_file(backbones, synthetic, tmp_path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f"""
model: {{vision: {backbones['vit']}, lm: {backbones['lm']}, projector: {{type: mlp2x_gelu}}}}
data: {{train_files: [{synthetic['train']}]}}
train: {{stage: finetune, batch_size: 4, lr: 1.0e-3, warmup_steps: 2, report_to: none}}
""")
    return path


def losses(run: Path) -> list[float]:
    return [h["loss"] for h in json.loads((run / "train_summary.json").read_text())["history"]]


def test_kill_9_then_resume_is_bit_identical(config_file, tmp_path):
    """40 steps cross an epoch boundary (96 samples, batch 4); checkpoints every 5 steps. The
    uninterrupted reference runs as its own process too, with the same thread count."""
    common = ["train.max_steps=40", "train.save_every=5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two runs share the cores; one thread each

    def run(out: Path, *extra: str) -> subprocess.Popen:
        args = [sys.executable, str(ROOT / "train.py"), str(config_file), *common, f"output_dir={out}", *extra]
        log = open(tmp_path / f"{out.name}-{len(extra)}.log", "w")
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    clean, out = run(tmp_path / "clean"), tmp_path / "killed"
    victim = run(out)
    deadline = time.time() + 600
    while not any(p.name == "checkpoint-10" for p in list_checkpoints(out)):
        assert victim.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (out / "final").exists()
    resumed_at = int(list_checkpoints(out)[-1].name.split("-")[1])

    resumed = run(out, "train.resume_from=latest")
    for proc in (clean, resumed):
        assert proc.wait(timeout=900) == 0, [p.read_text()[-3000:] for p in tmp_path.glob("*.log")]
    assert len(losses(out)) == 40
    assert losses(out)[resumed_at:] == losses(tmp_path / "clean")[resumed_at:]


def _poison(monkeypatch, bad_calls: set[int]) -> list[list[str]]:
    """Make the loss non-finite on the given forward calls (1-based), as a corrupt batch would."""
    original, calls = VLM.forward, {"n": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] in bad_calls:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(VLM, "forward", forward)


def _trainable_state(checkpoint: Path, tmp_path: Path) -> dict:
    target = tmp_path / f"{checkpoint.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint / "state", target)
    return torch.load(target, weights_only=False)


def test_nan_step_is_skipped_and_logged(config_file, tmp_path, monkeypatch):
    _poison(monkeypatch, {3})
    summary = train(load_config(config_file, ["train.max_steps=6", f"output_dir={tmp_path / 'run'}"]))
    assert summary["steps"] == 6 and summary["bad_steps"] == 1
    saved = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    [bad] = saved["bad_step_samples"]
    assert bad["after_step"] == 2 and len(bad["samples"]) == 4  # the poisoned batch, by sample id
    monkeypatch.undo()
    clean = train(load_config(config_file, ["train.max_steps=6", f"output_dir={tmp_path / 'clean'}"]))
    assert summary["history"][:2] == clean["history"][:2]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in summary["history"])


def test_too_many_bad_steps_abort_after_saving_the_last_good_state(config_file, tmp_path, monkeypatch):
    common = ["train.max_steps=6", "train.save_every=2", "train.max_bad_steps=3"]
    train(load_config(config_file, [*common, f"output_dir={tmp_path / 'clean'}"]))
    _poison(monkeypatch, {3, 4, 5})
    with pytest.raises(TrainingAborted, match="3 consecutive steps had a NaN/inf loss") as err:
        train(load_config(config_file, [*common, f"output_dir={tmp_path / 'bad'}"]))
    assert "checkpoint-2" in str(err.value)
    state = json.loads((tmp_path / "bad" / "checkpoint-2" / "trainer_state.json").read_text())
    assert [b["after_step"] for b in state["bad_steps"]] == [2, 2, 2]
    assert all(b["samples"] for b in state["bad_steps"]), "each bad step names its samples"
    # Three skipped steps changed nothing: weights and optimizer equal the clean run's step-2 checkpoint.
    bad = _trainable_state(tmp_path / "bad" / "checkpoint-2", tmp_path)
    good = _trainable_state(tmp_path / "clean" / "checkpoint-2", tmp_path)
    assert bad["model"].keys() == good["model"].keys()
    for key in good["model"]:
        assert torch.equal(bad["model"][key], good["model"][key]), key
    for key, value in good["optimizer"]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(torch.as_tensor(bad["optimizer"]["state"][key][name]), torch.as_tensor(tensor))


def test_save_total_limit_keeps_the_newest_checkpoints(config_file, tmp_path):
    out = tmp_path / "run"
    train(load_config(config_file, ["train.max_steps=9", "train.save_every=2", "train.save_total_limit=2",
                                    f"output_dir={out}"]))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-6", "checkpoint-8"]
    assert not list(out.glob("*.tmp"))


def test_trainer_state_reads_checkpoints_written_before_it_existed():
    """`trainer_state.json` keeps its flat keys, so older checkpoints load (and round-trip) unchanged."""
    from vlm.train.state import DataPosition, TrainState

    older = {"step": 10, "epoch": 1, "batches_in_epoch": 14, "history": [{"step": 10, "loss": 1.5}],
             "bad_steps": [{"after_step": 3, "samples": ["a"]}], "skipped": {"too_long": 2},
             "scheduler": {"last_epoch": 10}, "world_size": 1}
    state = TrainState.from_dict(older)
    assert (state.step, state.position, state.skipped) == (10, DataPosition(1, 14), {"too_long": 2})
    assert state.to_dict() == {k: v for k, v in older.items() if k not in ("scheduler", "world_size")}


def test_micro_batches_yield_the_position_after_each_step_and_change_nothing_else():
    """5 batches an epoch, 2 a step, resuming 2 batches in: the partial step at the epoch's end is dropped."""
    from itertools import islice

    from vlm.train.batches import micro_batches
    from vlm.train.state import DataPosition

    class Loader:
        start = 0

        def __iter__(self):
            return iter(range(self.start // 4, 5))

    class Sampler:
        def set_position(self, epoch: int, start: int) -> None:
            loader.start = start

    class Dataset:
        def set_epoch(self, epoch: int) -> None:
            pass

    loader, start = Loader(), DataPosition(0, 2)
    steps = list(islice(micro_batches(loader, Sampler(), Dataset(), start, per_step=2, batch_size=4), 3))
    assert steps == [([2, 3], DataPosition(0, 4)), ([0, 1], DataPosition(1, 2)), ([2, 3], DataPosition(1, 4))]
    assert start == DataPosition(0, 2)


def test_accumulated_micro_batches_follow_one_big_batch_with_one_all_reduce_per_step(config_file, tmp_path,
                                                                                    monkeypatch):
    """Two micro-batches of 2 per step train like one batch of 4 (the step's token-loss sums are scaled by the
    step's tokens, vlm/train/step.py), and the step makes one collective of its own, whatever the accumulation."""
    import vlm.train.step as step

    calls = []
    original = step.all_reduce_sum
    monkeypatch.setattr(step, "all_reduce_sum", lambda tensor, env: calls.append(tensor.tolist()) or original(tensor, env))
    common = ["train.max_steps=5", "train.save_every=0"]
    accumulated = train(load_config(config_file, [*common, "train.batch_size=2", "train.grad_accum=2",
                                                  f"output_dir={tmp_path / 'accumulated'}"]))
    assert len(calls) == 5 and all(len(c) == 3 for c in calls)  # (tokens, loss sum, stop) once per step
    whole = train(load_config(config_file, [*common, "train.batch_size=4", f"output_dir={tmp_path / 'whole'}"]))
    got, expected = [h["loss"] for h in accumulated["history"]], [h["loss"] for h in whole["history"]]
    assert got == pytest.approx(expected, rel=1e-5) and expected[-1] < expected[0]
    # The logged loss is the mean per supervised token: the reduced sum over the reduced count.
    assert calls[0][1] / calls[0][0] == pytest.approx(got[0], rel=1e-9)
