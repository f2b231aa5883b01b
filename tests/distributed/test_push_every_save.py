"""`hub.strategy=every_save` under every strategy: each checkpoint pushes a gathered, loadable folder, written as
`final/` is (LoRA merged, or an adapter folder with export.merge_lora=false), to the loopback hub.

Before the fix the push was skipped silently under FSDP2, ZeRO-2 and ZeRO-3, and a LoRA model raised in
`VLM.save_pretrained`. The pushed step-1 weights must equal the single-process run's: a folder holding one
rank's shards, or weights from another step, would not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hub_standin import TOKEN, running_hub
from dist_launch import run_jobs
from vlm.config import load_config
from vlm.data.collator import Collator
from vlm.data.formats import read_samples
from vlm.factory import processor_for
from vlm.model import VLM
from vlm.train import train
from vlm.train.lora import load_adapter_folder

SHARDED = ("ddp", "zero2", "fsdp2", "zero3")
LORA = ["train.lora.enabled=true", "train.lora.r=4", "train.lora.dropout=0"]
ADAPTER = [*LORA, "export.merge_lora=false"]


@pytest.fixture(scope="module")
def pushed(backbones, synthetic, tmp_path_factory):
    """Single-process references in this process, the sharded jobs in one launch; all push to one hub."""
    root = tmp_path_factory.mktemp("every_save")
    env = {"HF_TOKEN": TOKEN, "HF_HOME": str(root / "hf_home"), "NO_PROXY": "127.0.0.1,localhost"}
    with running_hub() as hub, pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield _run(root, hub, env, backbones, synthetic)


def _run(root: Path, hub, env: dict[str, str], backbones, synthetic) -> dict:
    config = root / "base.yaml"
    config.write_text(f"""
model: {{vision: {backbones['vit']}, lm: {backbones['lm']}, projector: {{type: mlp2x_gelu}}}}
data: {{train_files: [{synthetic['train']}]}}
train: {{stage: finetune, max_steps: 2, save_every: 1, lr: 1.0e-3, report_to: none}}
hub: {{push: true, strategy: every_save, endpoint: {hub.url}}}
""")

    def job(name: str, per_rank: int, extra: list[str]) -> list[str]:
        return [f"train.batch_size={per_rank}", f"output_dir={root / name}", f"hub.repo_id=acme/{name}", *extra]

    for name, extra in {"single": [], "single-lora": LORA, "single-adapter": ADAPTER}.items():
        train(load_config(config, job(name, 4, extra)))
    jobs = [job(s, 2, [f"train.strategy={s}"]) for s in SHARDED]
    jobs += [job("fsdp2-lora", 2, ["train.strategy=fsdp2", *LORA]), job("ddp-adapter", 2, ["train.strategy=ddp", *ADAPTER])]
    run_jobs(root / "launch", config, jobs)
    return {"root": root, "hub": hub}


RUNS = {  # run -> the single-process run it must equal
    "single": "single", "single-lora": "single-lora", "single-adapter": "single-adapter",
    **{s: "single" for s in SHARDED}, "fsdp2-lora": "single-lora", "ddp-adapter": "single-adapter",
}


def pushed_folder(hub, repo: str, summary: str, out: Path) -> Path:
    """The files of the commit `summary` to `repo`, written to `out`."""
    commit = next(c for c in hub.commits if c["repo"] == repo and c["summary"] == summary)
    for name, data in commit["files"].items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    return out


def load(folder: Path) -> VLM:
    model = load_adapter_folder(folder) if (folder / "vlm_adapter.json").is_file() else VLM.from_pretrained(folder)
    return model.eval()


def logits(model: VLM, synthetic) -> torch.Tensor:
    item = processor_for(model)(read_samples(synthetic["train"])[0][0])
    batch = Collator(model.tokenizer.pad_token_id)([item])
    with torch.no_grad():
        return model(**{k: getattr(batch, k) for k in ("input_ids", "attention_mask", "pixel_values")}).logits


@pytest.mark.parametrize("run", list(RUNS))
def test_every_checkpoint_pushes_then_the_final_model(pushed, run):
    commits = [c["summary"] for c in pushed["hub"].commits if c["repo"] == f"acme/{run}"]
    assert commits == ["Training in progress, step 1", "Final model"]


@pytest.mark.parametrize("run", list(RUNS))
def test_the_step_1_push_is_gathered_and_equals_the_single_process_model(pushed, run, synthetic, tmp_path):
    hub = pushed["hub"]
    got = load(pushed_folder(hub, f"acme/{run}", "Training in progress, step 1", tmp_path / "got"))
    adapter = "adapter" in run
    assert isinstance(got.lm, torch.nn.Module) and (hasattr(got.lm, "peft_config") == adapter)
    reference = RUNS[run]
    expected = logits(load(pushed_folder(hub, f"acme/{reference}", "Training in progress, step 1", tmp_path / "ref")),
                      synthetic)
    final = logits(load(pushed_folder(hub, f"acme/{reference}", "Final model", tmp_path / "final")), synthetic)
    assert (final - expected).abs().max() > 1e-2, "steps 1 and 2 must differ for this test to tell them apart"
    torch.testing.assert_close(logits(got, synthetic), expected, rtol=1e-3, atol=1e-3)


def test_pushed_final_is_the_local_final_folder(pushed):
    """What `final/` holds on disk is what the last push carried (model card included)."""
    for run in RUNS:
        final = pushed["root"] / run / "final"
        commit = [c for c in pushed["hub"].commits if c["repo"] == f"acme/{run}"][-1]
        local = {str(p.relative_to(final)): p.read_bytes() for p in final.rglob("*") if p.is_file()}
        assert commit["files"] == local, run
