"""A preference task in the embedded world (issue "Preference tuning"; docs/preference.md): a bias that only
preferences remove.

The SFT data is the synthetic world's conversations with every colour answer made verbose ("It is blue, as you
can see in the picture."), so the fine-tuned model answers colour questions with that sentence. The preference
pairs ask the same colour questions on other images: chosen the one-word answer, rejected the verbose one. DPO
should move the model to one word (and keep it right); the swapped pairs (chosen verbose) are the negative
control, which should move it further the other way.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

VERBOSE = "It is {colour}, as you can see in the picture."
"""The SFT data's colour answer: the bias."""


def verbose(colour: str) -> str:
    return VERBOSE.format(colour=colour)


def _is_colour(question: str) -> bool:
    q = question.lower()
    return ("colour" in q or "color" in q) and "how many" not in q  # "How many blue objects" counts


def _colour_turns(record: dict[str, Any], colour: bool = True) -> list[tuple[int, str, str]]:
    """(index of the question turn, question, answer) of each colour question in a synthetic conversation
    (`colour=False`: each other one-word question instead)."""
    turns = record["conversations"]
    out = []
    for i in range(0, len(turns) - 1, 2):
        question = turns[i]["value"].replace("<image>\n", "")
        answer = turns[i + 1]["value"]
        if _is_colour(question) == colour and (colour or len(answer.split()) == 1):
            out.append((i, question, answer))
    return out


def verbose_sft(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversations with every colour answer replaced by the verbose sentence."""
    out = []
    for record in records:
        turns = [dict(t) for t in record["conversations"]]
        for i, _, answer in _colour_turns(record):
            turns[i + 1]["value"] = verbose(answer)
        out.append({**record, "conversations": turns})
    return out


def pairs(records: list[dict[str, Any]], swapped: bool = False, others: bool = False) -> list[dict[str, Any]]:
    """One preference pair (TRL's standard format) per conversation with a colour question: chosen the one-word
    answer, rejected the verbose one (`swapped`: the other way round). `others`: one more pair per conversation
    on another question type, its one-word answer against the same verbose template (what the model already
    does there: pairs that show DPO what to keep)."""
    out = []
    for record in records:
        found = [(turn, "pref") for turn in _colour_turns(record)[:1]]
        if others:
            found += [(turn, "keep") for turn in _colour_turns(record, colour=False)[:1]]
        for (_, question, answer), tag in found:
            short, long = answer, verbose(answer)
            chosen, rejected = (long, short) if swapped else (short, long)
            out.append({"id": f"{record['id']}-{tag}", "image": record["image"], "prompt": f"<image>\n{question}",
                        "chosen": chosen, "rejected": rejected})
    return out


def write_preference_data(data: Path, out: Path, num_pairs: int = 1000, seed: int = 0) -> dict[str, Path]:
    """From the synthetic data folder `data` (train.json, eval.json, images/), write into `out`:
    sft_verbose.json (the first half of train.json, colour answers verbose), pairs_train.json and
    pairs_swapped.json (`num_pairs` pairs from the other half: no image is in both), pairs_mixed.json and
    pairs_mixed_swapped.json (the same conversations, with a pair on another question type each: `others`),
    pairs_eval.json (eval.json).
    Image paths point into `data`."""
    out.mkdir(parents=True, exist_ok=True)
    train = json.loads((data / "train.json").read_text())
    evaluation = json.loads((data / "eval.json").read_text())
    rebase = lambda rs: [{**r, "image": str((data / r["image"]).resolve())} for r in rs]  # noqa: E731
    train, evaluation = rebase(train), rebase(evaluation)
    half = len(train) // 2
    rng = random.Random(seed)
    pool = train[half:]
    rng.shuffle(pool)
    files = {
        "sft": (out / "sft_verbose.json", verbose_sft(train[:half])),
        "pairs": (out / "pairs_train.json", pairs(pool)[:num_pairs]),
        "swapped": (out / "pairs_swapped.json", pairs(pool, swapped=True)[:num_pairs]),
        "mixed": (out / "pairs_mixed.json", pairs(pool, others=True)[:2 * num_pairs]),
        "mixed_swapped": (out / "pairs_mixed_swapped.json", pairs(pool, swapped=True, others=True)[:2 * num_pairs]),
        "eval": (out / "pairs_eval.json", pairs(evaluation)),
        "sft_eval": (out / "sft_verbose_eval.json", verbose_sft(evaluation)),
    }
    for path, records in files.values():
        path.write_text(json.dumps(records, indent=1))
    return {name: path for name, (path, _) in files.items()}
