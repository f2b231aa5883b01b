"""The embedded preference task (docs/preference.md): a bias only preferences remove, before and after DPO.

1. Data (vlm/embedded/preference.py): the quickstart's synthetic conversations with every colour answer made
   verbose ("It is blue, as you can see in the picture."), and 1,000 pairs on other images preferring the
   one-word answer (and the same pairs swapped: the negative control).
2. `vlm train configs/quickstart.yaml` on the verbose data: the biased SFT model.
3. `vlm train configs/recipes/dpo.yaml` from it, on the pairs and on the swapped pairs (`--pairs mixed`, the
   recipe's: half the pairs on other question types, their one-word answers preferred; `colour`: colour only).
4. Each model answers the synthetic test set by generation: colour questions scored for the share of one-word
   answers and of answers naming the right colour, the other question types by VQA accuracy; and, teacher-forced,
   the mean log p(one word) - log p(verbose) on the test colour questions.

    python scripts/bench_preference.py --out artifacts/preference            # everything, ~25 min on 2 cores
    python scripts/bench_preference.py --dpo-only --name lr1e5 train.lr=1e-5  # a DPO variant from the same SFT model
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from vlm.config import load_config
from vlm.data.collator import Collator
from vlm.data.dataset import ConversationDataset
from vlm.embedded.preference import pairs, write_preference_data
from vlm.eval.metrics import vqa_accuracy
from vlm.eval.predict import predict, read_predictions
from vlm.factory import load
from vlm.train import train
from vlm.train.dpo import sequence_logps

DATA = Path("artifacts/quickstart/data")


def run(config: str, overrides: list[str]) -> float:
    started = time.perf_counter()
    train(load_config(config, overrides))
    return time.perf_counter() - started


def score(folder: Path, test: Path, out: Path) -> dict[str, float]:
    """Generated answers on the test set and the teacher-forced preference margin on its colour questions."""
    model, processor = load(folder)
    predict(model, processor, test, out / "predictions.jsonl", max_new_tokens=24, batch_size=32)
    predictions = read_predictions(out / "predictions.jsonl")
    records = json.loads(test.read_text())
    by_type: dict[str, list[float]] = defaultdict(list)
    one_word, right = [], []
    for record in records:
        answer = predictions[record["id"]]
        if record["type"] == "colour":
            one_word.append(float(len(answer.split()) == 1))
            right.append(float(record["answers"][0] in answer.lower().replace(",", " ").replace(".", " ").split()))
        elif record["type"] != "caption":
            by_type[record["type"]].append(vqa_accuracy(answer, record["answers"]))
    colour = [{**r, "image": str((test.parent / r["image"]).resolve())} for r in records if r["type"] == "colour"]
    margin = preference_margin(model, processor, pairs(colour))
    other = [v for values in by_type.values() for v in values]
    return {"colour_one_word": 100 * sum(one_word) / len(one_word), "colour_right": 100 * sum(right) / len(right),
            "colour_items": len(one_word), "other_vqa": 100 * sum(other) / len(other), "other_items": len(other),
            **{f"vqa_{t}": 100 * sum(v) / len(v) for t, v in sorted(by_type.items())},
            "margin_short_minus_verbose": margin}


@torch.no_grad()
def preference_margin(model, processor, records: list[dict]) -> float:
    """Mean over pairs of log p(chosen) - log p(rejected), teacher-forced (chosen: the one-word answer)."""
    path = Path("/tmp") / f"pref-margin-{id(records)}.json"
    path.write_text(json.dumps(records))
    dataset = ConversationDataset.from_files([str(path)], processor)
    collate, margins = Collator(processor.tokenizer.pad_token_id), []
    model.eval()
    for start in range(0, len(dataset), 32):
        batch = collate([dataset[i] for i in range(start, min(start + 32, len(dataset)))])
        logps = sequence_logps(model(**batch.model_inputs(), num_items_in_batch=1).logits, batch.labels)[0]
        chosen, rejected = logps.chunk(2)
        margins += (chosen - rejected).tolist()
    return sum(margins) / len(margins)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("artifacts/preference"))
    parser.add_argument("--dpo-only", action="store_true", help="reuse the SFT model in --out")
    parser.add_argument("--name", default="dpo", help="the DPO runs' folders: OUT/NAME and OUT/NAME_swapped")
    parser.add_argument("--pairs", choices=["colour", "mixed"], default="mixed",
                        help="colour: pairs on colour questions only; mixed: plus one pair per conversation on "
                             "another question type (its one-word answer preferred, as the model already does)")
    parser.add_argument("dpo_overrides", nargs="*", help="dotted overrides for both DPO runs")
    args = parser.parse_args()
    out = args.out
    files = write_preference_data(DATA, out / "data")
    times = {}
    if not args.dpo_only:
        times["sft"] = run("configs/quickstart.yaml", [f"data.train_files=[{files['sft']}]",
                                                        f"data.eval_files=[{files['sft_eval']}]",
                                                        f"output_dir={out / 'sft'}", "train.report_to=none"])
    common = [f"model.init_from={out / 'sft' / 'final'}", f"data.eval_files=[{files['eval']}]", "train.report_to=none",
              *args.dpo_overrides]
    name, swapped = args.name, f"{args.name}_swapped"
    forward, backward = ("pairs", "swapped") if args.pairs == "colour" else ("mixed", "mixed_swapped")
    times[name] = run("configs/recipes/dpo.yaml", [*common, f"data.train_files=[{files[forward]}]",
                                                    f"output_dir={out / name}"])
    times[swapped] = run("configs/recipes/dpo.yaml", [*common, f"data.train_files=[{files[backward]}]",
                                                       f"output_dir={out / swapped}"])
    test = DATA / "test.json"
    results = {run_name: {**score(out / run_name / "final", test, out / run_name), "train_seconds": times.get(run_name),
                          "overrides": args.dpo_overrides if run_name != "sft" else []}
               for run_name in ("sft", name, swapped)}
    (out / f"results_{name}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
