"""vlm/loss.py: the one causal-LM loss matches transformers' and reads only supervised positions."""

import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from vlm.loss import IGNORE_INDEX, causal_lm_loss, count_supervised, logits_positions


def _example() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX, IGNORE_INDEX],
                           [IGNORE_INDEX, 5, 6, 7, 8, 9]])
    return logits, labels


def test_matches_transformers_causal_lm_loss_mean_and_global_count():
    logits, labels = _example()
    expected = ForCausalLMLoss(logits, labels, vocab_size=11)
    torch.testing.assert_close(causal_lm_loss(logits, labels), expected)
    items = torch.tensor(20)
    expected = ForCausalLMLoss(logits, labels, vocab_size=11, num_items_in_batch=items)
    torch.testing.assert_close(causal_lm_loss(logits, labels, items), expected)


def test_logits_at_kept_positions_only_give_the_same_loss():
    logits, labels = _example()
    kept = logits_positions(labels)
    assert kept.tolist() == [[False, True, True, False, False, False], [True, True, True, True, True, False]]
    assert count_supervised(labels) == int(kept.sum()) == 7
    for items in (None, torch.tensor(9)):
        torch.testing.assert_close(causal_lm_loss(logits[kept], labels, items, kept), causal_lm_loss(logits, labels, items))


def test_no_supervised_token_with_a_global_count_is_zero():
    logits, labels = _example()
    none = torch.full_like(labels, IGNORE_INDEX)
    assert float(causal_lm_loss(logits, none, torch.tensor(4))) == 0.0
