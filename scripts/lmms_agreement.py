"""lmms-eval and `vlm eval` on the same answers: the figure in docs/benchmarks.md (lmms-eval section).

    python scripts/lmms_agreement.py --model RUN/final --data DATA/test.json --out artifacts/lmms_agreement

Runs `lmms-eval --model vlm --tasks vlm_synthetic_vqa` on every VQA question of `--data`, scores its
logged answers with `vlm eval`, answers the same questions with `vlm predict` (same order and batch
size), and prints both scores, whether the answers are identical, and the wall time of each path,
`--repeats` times alternately (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from vlm.eval.lmms_task import DATA_ENV, logged_answers, vqa_docs
from vlm.eval.lmms_tasks import TASKS_DIR
from vlm.eval.predict import evaluate_predictions, read_predictions

TASK = "vlm_synthetic_vqa"


def timed(cmd: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved VLM folder")
    parser.add_argument("--data", required=True, help="a per-question test file (scripts/make_synthetic_data.py)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    out, data = Path(args.out), Path(args.data).resolve()
    out.mkdir(parents=True, exist_ok=True)
    records = {r["id"]: r for r in json.loads(data.read_text())}
    questions = out / "questions.json"  # the task's docs, in its order, for `vlm predict`
    questions.write_text(json.dumps([records[doc["id"]] for doc in vqa_docs(str(data))]))
    env = {**os.environ, DATA_ENV: str(data), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    bin_dir = Path(sys.executable).parent
    lmms_cmd = [str(bin_dir / "lmms-eval"), "--model", "vlm", "--model_args", f"pretrained={args.model}",
                "--batch_size", str(args.batch_size), "--tasks", TASK, "--include_path", str(TASKS_DIR),
                "--output_path", str(out / "lmms"), "--log_samples"]
    predict_cmd = [str(bin_dir / "vlm"), "predict", "--model", args.model, "--data", str(questions), "--image-root",
                   str(data.parent), "--out", str(out / "predict.jsonl"), "--batch-size", str(args.batch_size)]
    times: dict[str, list[float]] = {"lmms_eval_s": [], "vlm_predict_s": []}
    for _ in range(args.repeats):
        times["lmms_eval_s"].append(timed(lmms_cmd, env))
        times["vlm_predict_s"].append(timed(predict_cmd, env))
    answers = logged_answers(out / "lmms", data)
    (out / "lmms_preds.jsonl").write_text("".join(json.dumps({"id": k, "prediction": v}) + "\n"
                                                  for k, v in answers.items()))
    results = json.loads(sorted((out / "lmms").rglob("*_results.json"))[-1].read_text())["results"][TASK]
    ours = evaluate_predictions(out / "lmms_preds.jsonl", data)["vqa"]
    print(json.dumps({
        "questions": len(answers), "lmms_eval_vqa_accuracy": results["vqa_accuracy,none"],
        "vlm_eval_vqa_accuracy": ours["accuracy"], "vlm_eval_count": ours["count"],
        "answers_equal_vlm_predict": read_predictions(out / "predict.jsonl") == answers, **times,
    }, indent=2))


if __name__ == "__main__":
    main()
