"""`vlm train` with train.objective=dpo: every fusion, every reference choice, and the preference it learns."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vlm.config import load_config
from vlm.data.collator import Collator
from vlm.data.dataset import ConversationDataset
from vlm.embedded.preference import pairs
from vlm.factory import load
from vlm.train import train
from vlm.train.dpo import METRICS, sequence_logps

FUSIONS = {
    "projector": ["model.fusion=projector", "model.projector.type=mlp2x_gelu"],
    "resampler": ["model.fusion=resampler", "model.resampler.latents=4"],
    "early": ["model.fusion=early"],
    "cross_attention": ["model.fusion=cross_attention", "model.cross_attention.every_n_layers=2"],
    "late": ["model.fusion=late", "model.late.combine=product"],
}
ADAPTERS_ONLY = ["train.lora.enabled=true", "train.lora.r=4", "train.lora.dropout=0", "train.lora.train_new_tokens=false",
                 "train.stage=custom", "train.freeze.vision=true", "train.freeze.fusion=true", "train.freeze.lm=false"]


def _pair_files(synthetic: dict[str, Path], root: Path, swapped: bool = False) -> tuple[Path, Path]:
    """The synthetic conversations' colour questions as pairs (chosen one word, rejected verbose), absolute paths."""
    files = []
    for split in ("train", "eval"):
        records = json.loads(synthetic[split].read_text())
        records = [{**r, "image": str((synthetic[split].parent / r["image"]).resolve())} for r in records]
        path = root / f"pairs-{split}{'-swapped' if swapped else ''}.json"
        path.write_text(json.dumps(pairs(records, swapped=swapped)))
        files.append(path)
    return files[0], files[1]


def _dpo(backbones, data: tuple[Path, Path], out: Path, overrides: list[str]) -> dict:
    config = load_config(None, [
        f"model.vision={backbones['vit']}", f"model.lm={backbones['lm']}", f"data.train_files=[{data[0]}]",
        f"data.eval_files=[{data[1]}]", "train.objective=dpo", "train.stage=finetune", "train.batch_size=4",
        "train.lr=1e-3", "train.warmup_steps=0", "train.report_to=none", "train.seed=0", f"output_dir={out}",
        *overrides,
    ])
    torch.manual_seed(0)
    return train(config)


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_dpo_trains_every_fusion(backbones, synthetic, tmp_path, fusion):
    summary = _dpo(backbones, _pair_files(synthetic, tmp_path), tmp_path / "run",
                   [*FUSIONS[fusion], "train.max_steps=5", "train.eval_every=5"])
    history = summary["history"]
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as its reference
    assert all(set(METRICS) <= set(h) for h in history)
    assert all(0 <= h["rewards/accuracies"] <= 1 for h in history)
    assert history[-1]["loss"] < math.log(2) - 0.01 and history[-1]["rewards/margins"] > 0
    assert 0 < summary["eval_loss"] < math.log(2)  # DPO's own loss on the held-out pairs
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "## Preference tuning" in card and "DPO (beta 0.1)" in card and "pairs-train.json" in card


@pytest.mark.parametrize("variant", ["adapters", "copy"])
def test_every_reference_choice_gives_the_same_run(backbones, synthetic, tmp_path, variant, caplog):
    """The reference in memory (the LM with adapters disabled, or a frozen copy) and the precomputed
    log-probabilities are the same initial policy: the same losses, step by step."""
    data = _pair_files(synthetic, tmp_path)
    extra = [*FUSIONS["projector"], "train.max_steps=6", *(ADAPTERS_ONLY if variant == "adapters" else [])]
    with caplog.at_level("INFO", logger="vlm.train.loop"):
        live = _dpo(backbones, data, tmp_path / "live", extra)
    expected = {"adapters": "the policy with its LoRA adapters disabled", "copy": "a frozen copy of the initial model"}
    assert f"DPO reference: {expected[variant]}" in caplog.text
    pre = _dpo(backbones, data, tmp_path / "pre", [*extra, "train.dpo.precompute_reference=true"])
    got, want = [h["loss"] for h in live["history"]], [h["loss"] for h in pre["history"]]
    assert got[0] == pytest.approx(math.log(2), abs=1e-6) and got[-1] < got[0]
    for step, (a, b) in enumerate(zip(got, want), start=1):
        assert a == pytest.approx(b, rel=1e-5), f"step {step}: {a} (live reference) vs {b} (precomputed)"


def _margin(folder: Path, pairs_file: Path) -> float:
    """Mean log p(one word) - log p(verbose) over the held-out pairs, teacher-forced."""
    model, processor = load(folder)
    dataset = ConversationDataset.from_files([str(pairs_file)], processor)
    batch = Collator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        logps = sequence_logps(model.eval()(**batch.model_inputs(), num_items_in_batch=1).logits, batch.labels)[0]
    chosen, rejected = logps.chunk(2)
    return float((chosen - rejected).mean())


def test_dpo_moves_the_preference_and_swapped_pairs_move_it_back(backbones, synthetic, trained_run, tmp_path):
    """From the session's fine-tuned model: DPO on pairs preferring the one-word colour answer raises its
    log-probability margin over the verbose one on held-out pairs; the same pairs swapped lower it."""
    start = trained_run / "final"
    forward, backward = _pair_files(synthetic, tmp_path), _pair_files(synthetic, tmp_path, swapped=True)
    before = _margin(start, forward[1])
    common = [*FUSIONS["projector"], f"model.init_from={start}", "train.max_steps=8", "train.lr=3e-4"]
    _dpo(backbones, forward, tmp_path / "dpo", common)
    _dpo(backbones, backward, tmp_path / "swapped", common)
    after, swapped = _margin(tmp_path / "dpo" / "final", forward[1]), _margin(tmp_path / "swapped" / "final", forward[1])
    assert after > before + 1.0, (before, after)
    assert swapped < before - 1.0, (before, swapped)


def test_an_unreadable_eval_pair_is_counted_and_weighs_nothing(backbones, synthetic, tmp_path):
    """An eval pair whose image cannot be decoded is replaced by a stand-in with no scored token on either side:
    the run finishes, the pair is counted by category, and the eval loss is the readable pairs' own."""
    train, evaluation = _pair_files(synthetic, tmp_path)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG broken")
    pairs_ = json.loads(evaluation.read_text())
    bad = [*pairs_, {**pairs_[0], "id": "broken", "image": str(tmp_path / "corrupt.png")}]
    (tmp_path / "bad-eval.json").write_text(json.dumps(bad))
    clean = _dpo(backbones, (train, evaluation), tmp_path / "clean", [*FUSIONS["projector"], "train.max_steps=2"])
    with_bad = _dpo(backbones, (train, tmp_path / "bad-eval.json"), tmp_path / "bad",
                    [*FUSIONS["projector"], "train.max_steps=2"])
    assert with_bad["eval_skipped_samples"] == {"corrupt_image": 1}
    assert with_bad["eval_loss"] == pytest.approx(clean["eval_loss"], rel=1e-5)
