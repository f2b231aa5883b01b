"""A sharded run whose eval batch is unreadable on one rank finishes: every rank runs every eval forward
(FSDP2 and ZeRO-3 gather weights in each), `final/` is written and the unreadable samples are counted.

Before the fix, the rank whose batch held only unreadable images skipped the forward and the other waited
in the all-gather until killed, leaving no `final/`. The launch is killed after 240 s without progress, so a regression fails in minutes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_launch import run_jobs

STRATEGIES = ("fsdp2", "zero3")
BAD_ON = {"rank0": (0, 2), "rank1": (1, 3)}
"""Which of the 4 eval samples are unreadable: the eval sampler gives rank 0 samples 0 and 2, rank 1 samples 1 and 3."""


def eval_file(synthetic: dict[str, Path], bad: tuple[int, ...], out: Path) -> Path:
    """4 eval samples whose images `bad` are 16 bytes of text named .png."""
    samples = json.loads(synthetic["eval"].read_text())[:4]
    for i, sample in enumerate(samples):
        sample["id"] = f"eval-{i}"
        if i in bad:
            fake = out.parent / f"{out.stem}-not-an-image-{i}.png"
            fake.write_bytes(b"this is not a png")
            sample["image"] = str(fake)
        else:
            sample["image"] = str((synthetic["eval"].parent / sample["image"]).resolve())
    out.write_text(json.dumps(samples))
    return out


@pytest.fixture(scope="module")
def runs(backbones, synthetic, tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("eval_unreadable")
    config = root / "base.yaml"
    config.write_text(f"""
model: {{vision: {backbones['vit']}, lm: {backbones['lm']}}}
data: {{train_files: [{synthetic['train']}]}}
train: {{stage: finetune, max_steps: 2, batch_size: 4, eval_batch_size: 2, lr: 1.0e-3, report_to: none}}
""")
    files = {name: eval_file(synthetic, bad, root / f"eval-{name}.json") for name, bad in BAD_ON.items()}
    readable = json.loads(files["rank0"].read_text())[1::2]  # samples 1 and 3 alone
    (root / "eval-readable.json").write_text(json.dumps(readable))
    jobs = [["train.strategy=fsdp2", f"data.eval_files=[{root / 'eval-readable.json'}]",
             f"output_dir={root / 'fsdp2-readable'}"]]
    for strategy in STRATEGIES:
        # Bad samples on rank 0, evaluated at the end only; on rank 1, also mid-run (step 2 of 3).
        jobs.append([f"train.strategy={strategy}", f"data.eval_files=[{files['rank0']}]",
                     f"output_dir={root / f'{strategy}-rank0'}"])
        jobs.append([f"train.strategy={strategy}", f"data.eval_files=[{files['rank1']}]", "train.max_steps=3",
                     "train.eval_every=2", f"output_dir={root / f'{strategy}-rank1'}"])
    return {"root": root, "log": run_jobs(root / "launch", config, jobs)}


@pytest.mark.parametrize("bad_on", list(BAD_ON))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_run_finishes_writes_final_and_counts_unreadable_eval_samples(runs, strategy, bad_on):
    run = runs["root"] / f"{strategy}-{bad_on}"
    assert (run / "final" / "config.json").is_file() and (run / "final" / "model.safetensors").is_file()
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["eval_skipped_samples"] == {"corrupt_image": 2}
    evaluated_at = [entry["step"] for entry in summary["eval_history"]]
    assert evaluated_at == ([2, 3] if bad_on == "rank1" else [2])
    # The loss is over the two readable samples only: finite and positive, not the stand-ins' zero weight.
    assert all(0.0 < entry["loss"] < 20.0 for entry in summary["eval_history"])


def test_eval_loss_is_the_readable_samples_loss(runs):
    """The stand-in batch weighs nothing: the loss equals an eval on the two readable samples alone."""
    def eval_loss(name: str) -> float:
        return json.loads((runs["root"] / name / "train_summary.json").read_text())["eval_loss"]

    assert eval_loss("fsdp2-rank0") == pytest.approx(eval_loss("fsdp2-readable"), rel=1e-5)


def test_the_log_names_the_unreadable_eval_samples(runs):
    lines = [line for line in runs["log"].splitlines() if "unreadable eval sample" in line]
    # Each of the 4 jobs logs once per evaluation on the main process: 1 + 2 evaluations per strategy.
    assert len(lines) == 2 * (1 + 2), lines
    assert all("skipped 2 unreadable eval sample(s) (corrupt_image: 2)" in line for line in lines)
    assert sum("eval-0, eval-2" in line for line in lines) == 2 and sum("eval-1, eval-3" in line for line in lines) == 4
