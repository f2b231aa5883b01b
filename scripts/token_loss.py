"""Where a trained model's loss sits: end-of-turn targets vs every other answer token.

Teacher-forced over a data file. For each group of supervised target tokens it prints the mean
cross-entropy, the share of the summed loss, how often the greedy (argmax) token is the target, and
how far the top logit stands above the mean logit over the vocabulary (a frozen output head caps it).
An LM that cannot emit the end-of-turn token keeps talking after a correct answer: generation then
fails while the word-level loss looks fine. Used for the LoRA diagnosis in docs/lora.md:

    python scripts/token_loss.py --model RUN/final --data artifacts/quickstart/data/eval.json
"""

from __future__ import annotations

import argparse
import json
import torch
import torch.nn.functional as F

from vlm.data.collator import Collator
from vlm.data.formats import read_samples
from vlm.factory import load
from vlm.loss import IGNORE_INDEX


def token_groups(model_dir: str, data: str, batch_size: int = 32, limit: int | None = None) -> dict:
    model, processor = load(model_dir)
    model.eval()
    tokenizer = model.tokenizer
    eos = model.lm.generation_config.eos_token_id  # the end-of-turn token is one of these
    end_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), dtype=torch.long)
    samples = read_samples(data)[0][:limit]
    collate = Collator(tokenizer.pad_token_id)
    stats = {name: {"loss": 0.0, "n": 0, "argmax_ok": 0, "margin": 0.0} for name in ("end_of_turn", "other")}
    for start in range(0, len(samples), batch_size):
        batch = collate([processor(s) for s in samples[start:start + batch_size]])
        with torch.no_grad():
            out = model(**{k: getattr(batch, k) for k in ("input_ids", "attention_mask", "pixel_values")}, full_logits=True)
        logits = out.logits[:, :-1].float()
        targets = batch.labels[:, 1:]
        keep = targets != IGNORE_INDEX
        losses = F.cross_entropy(logits[keep], targets[keep], reduction="none")
        argmax_ok = logits[keep].argmax(-1) == targets[keep]
        margin = logits[keep].amax(-1) - logits[keep].mean(-1)  # how far the top logit stands out
        is_end = torch.isin(targets[keep], end_ids)
        for name, mask in (("end_of_turn", is_end), ("other", ~is_end)):
            stats[name]["loss"] += float(losses[mask].sum())
            stats[name]["n"] += int(mask.sum())
            stats[name]["argmax_ok"] += int(argmax_ok[mask].sum())
            stats[name]["margin"] += float(margin[mask].sum())
    total = sum(s["loss"] for s in stats.values())
    return {
        name: {
            "tokens": s["n"], "mean_loss": s["loss"] / max(s["n"], 1),
            "share_of_loss": s["loss"] / total if total else 0.0, "argmax_accuracy": s["argmax_ok"] / max(s["n"], 1),
            "top_logit_above_mean": s["margin"] / max(s["n"], 1),
        }
        for name, s in stats.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved VLM folder (a LoRA run's merged final/)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--limit", type=int, default=None, help="first N samples only")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(json.dumps(token_groups(args.model, args.data, limit=args.limit), indent=2))


if __name__ == "__main__":
    main()
