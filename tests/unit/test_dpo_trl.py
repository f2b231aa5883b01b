"""The DPO / IPO loss and its gradient equal TRL's `DPOTrainer` on the same model and batch (trl from the dev
extra; its code is run, not copied). A tiny random Llama stands in for the policy and the reference."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers

from vlm.loss import IGNORE_INDEX
from vlm.train.dpo import dpo_losses, sequence_logps

trl = pytest.importorskip("trl", reason="trl is in the dev extra (make install-dev)")

WORDS = "the a red blue green circle square is it as you can see in picture one word answer what colour".split()


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _model(seed: int, vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(config).float()


PAIRS = [
    {"prompt": "what colour is the circle", "chosen": " red", "rejected": " it is red as you can see in the picture"},
    {"prompt": "what colour is the square", "chosen": " it is blue", "rejected": " green"},
    {"prompt": "the circle is", "chosen": " a red circle", "rejected": " one word answer"},
]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_and_gradient_equal_trl(loss_type: str, tmp_path) -> None:
    tokenizer = _tokenizer()
    policy, reference = _model(0, len(tokenizer)), _model(1, len(tokenizer))  # different: the log-ratios are not 0
    args = trl.DPOConfig(output_dir=str(tmp_path), beta=0.3, loss_type=[loss_type], report_to=[], use_cpu=True,
                         bf16=False, per_device_train_batch_size=len(PAIRS))
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(PAIRS),
                             processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    policy.train(False)  # no dropout in either computation (the tiny Llama has none; this makes it certain)
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()
    their_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()

    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    assert (labels != IGNORE_INDEX).sum() > 0
    logps, tokens = sequence_logps(policy(batch["input_ids"], attention_mask=batch["attention_mask"]).logits, labels)
    with torch.no_grad():
        ref, _ = sequence_logps(reference(batch["input_ids"], attention_mask=batch["attention_mask"]).logits, labels)
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref.chunk(2)
    chosen_tokens, rejected_tokens = tokens.chunk(2)
    ours = dpo_losses(chosen, rejected, ref_chosen, ref_rejected, 0.3, loss_type, chosen_tokens,
                      rejected_tokens).mean()
    ours.backward()

    assert abs(theirs.item() - ours.item()) <= 1e-6 * max(1.0, abs(theirs.item()))
    assert ours.item() != pytest.approx(0.6931, abs=1e-3)  # the two models differ: not the trivial log 2
    for ours_grad, theirs_grad in zip((p.grad for p in policy.parameters()), their_grads):
        torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-4, atol=1e-6)  # fp32 rounding: TRL fuses the head
    assert any(g.abs().sum() > 0 for g in their_grads)
