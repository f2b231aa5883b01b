"""Text ability kept, measured (vlm/eval/retention.py): replies to 120 text-only chat prompts against the base LM.

A model whose LM did not change must answer every prompt exactly as its base and score the base's replies at
the base's own loss; a moved LM must show in both figures. The untrained tiny LM answers chat prompts with
nothing (it never saw a chat turn), so the comparisons start from the 40-step captioner, which answers every
prompt; the real-backbone tests measure SmolLM2 itself."""

from __future__ import annotations

import json

import pytest
import torch

from vlm.cli import main
from vlm.config import Config
from vlm.eval.retention import CHAT_PROMPTS, base_model, retention
from vlm.factory import processor_for, save
from vlm.model import VLM

PROMPTS = list(CHAT_PROMPTS[:24])  # the tests' share; `vlm eval --retention` uses all 120


@pytest.fixture(scope="module")
def untrained(backbones) -> VLM:
    config = Config()
    config.model.vision, config.model.lm = str(backbones["vit"]), str(backbones["lm"])
    return VLM.from_config(config.model).eval()


def test_the_prompts_are_fixed_and_distinct():
    assert len(CHAT_PROMPTS) == len(set(CHAT_PROMPTS)) == 120
    assert CHAT_PROMPTS[0] == "What is the sun?" and CHAT_PROMPTS[-1] == "How would you describe electricity to a child?"


@pytest.fixture(scope="module")
def captioner(trained_run) -> VLM:
    return VLM.from_pretrained(trained_run / "final").eval()


def test_an_unchanged_lm_keeps_every_reply(captioner, trained_run):
    same = VLM.from_pretrained(trained_run / "final")
    result = retention(same, captioner, processor_for(captioner), PROMPTS, max_new_tokens=12)
    assert result["prompts"] == 24 and result["identical_replies"] == 1.0
    assert result["loss_on_base_replies"] == pytest.approx(result["base_loss_on_own_replies"], rel=1e-5)
    assert all(example["base"] for example in result["examples"])  # there is something to compare


def test_a_changed_lm_loses_replies_and_scores_them_worse(captioner, trained_run):
    changed = VLM.from_pretrained(trained_run / "final")
    torch.manual_seed(0)
    with torch.no_grad():  # as a destructive fine-tune would (the tiny LM's 2 layers alone barely matter)
        for p in changed.lm.parameters():
            p.add_(torch.randn_like(p) * p.std())
    result = retention(changed, captioner, processor_for(captioner), PROMPTS, max_new_tokens=12)
    # The captioner's chat replies are one or two tokens ("small", "."), so even a wrecked LM repeats many.
    assert result["identical_replies"] < 1.0
    assert result["loss_on_base_replies"] > result["base_loss_on_own_replies"] + 0.5


def test_vlm_eval_retention_prints_the_figures(untrained, tmp_path, capsys):
    save(untrained, processor_for(untrained), tmp_path / "model")
    assert main(["eval", "--retention", str(tmp_path / "model"), "--max-new-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompts"] == 120 and out["identical_replies"] == 1.0  # its own base: the LM was not trained
    assert main(["eval", "--data", "x.json"]) == 2
