"""lmms-eval, run as users run it (`lmms-eval --model vlm ... --include_path`), on the session's trained model
and the local synthetic VQA task (its first 16 questions).

Its answers must be `vlm predict`'s on the same questions, and its score (lmms-eval's own VQA answer
normalisation) must equal `vlm eval`'s VQA accuracy on those answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlm.cli import main
from vlm.eval.lmms_tasks import TASKS_DIR
from vlm.eval.metrics import vqa_accuracy
from vlm.eval.predict import evaluate_predictions, read_predictions

LIMIT = 16
TASK = "vlm_synthetic_vqa"
DATA_ENV = "VLM_LMMS_DATA"  # vlm.eval.lmms_task.DATA_ENV, which is imported only inside tests (below)


@pytest.fixture(scope="module", autouse=True)
def pil_default_restored():
    """Importing lmms_eval.api.task sets PIL's ImageFile.LOAD_TRUNCATED_IMAGES = True for the whole process;
    tests later in the session expect PIL's default (a truncated image is an error), so lmms-eval modules are
    imported inside tests only, and the flag is put back after this module."""
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    yield
    ImageFile.LOAD_TRUNCATED_IMAGES = before


def lmms_eval(args: list[str], data: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """The `lmms-eval` console script of this environment, offline, reading `data`."""
    env = {**os.environ, DATA_ENV: str(data), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}
    return subprocess.run([str(Path(sys.executable).parent / "lmms-eval"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def lmms_run(trained_run, synthetic, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("lmms")
    done = lmms_eval(["--model", "vlm", "--model_args", f"pretrained={trained_run / 'final'}", "--batch_size", "8",
                      "--tasks", TASK, "--include_path", str(TASKS_DIR), "--limit", str(LIMIT),
                      "--output_path", str(out), "--log_samples"], synthetic["test"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    from vlm.eval.lmms_task import logged_answers

    results = json.loads(next(out.rglob("*_results.json")).read_text())
    return {"results": results, "answers": logged_answers(out, synthetic["test"])}


def test_lmms_eval_answers_are_vlm_predicts(lmms_run, trained_run, synthetic, tmp_path):
    answers = lmms_run["answers"]
    assert len(answers) == LIMIT
    # The same questions in the same order, so `vlm predict` batches them as lmms-eval did (8 a batch).
    records = {r["id"]: r for r in json.loads(synthetic["test"].read_text())}
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps([records[i] for i in sorted(answers, key=lambda i: list(records).index(i))]))
    preds = tmp_path / "preds.jsonl"
    assert main(["predict", "--model", str(trained_run / "final"), "--data", str(questions), "--image-root",
                 str(synthetic["test"].parent), "--out", str(preds), "--batch-size", "8"]) == 0
    assert read_predictions(preds) == answers
    assert any(answers.values()), answers


def test_lmms_eval_score_equals_vlm_eval_on_the_same_answers(lmms_run, synthetic, tmp_path):
    preds = tmp_path / "lmms_preds.jsonl"
    preds.write_text("".join(json.dumps({"id": k, "prediction": v}) + "\n" for k, v in lmms_run["answers"].items()))
    ours = evaluate_predictions(preds, synthetic["test"])
    theirs = lmms_run["results"]["results"][TASK]["vqa_accuracy,none"]
    assert ours["vqa"]["count"] == LIMIT
    assert theirs == pytest.approx(ours["vqa"]["accuracy"], abs=1e-12)


@pytest.mark.parametrize("prediction,references", [
    ("Two.", ["2"]), ("the red", ["red"]), ("dont know", ["don't know"]), ("1,000", ["1000"]),
    ("black/white", ["black white"]), ("a circle!", ["circle"]), ("blue", ["red"]), ("three", ["3", "3", "4"]),
    ("3", ["3", "3", "3", "4"]), ("yes", ["yes", "no", "no"]),
])
def test_the_two_scorers_agree_on_answers_that_need_normalising(prediction, references):
    """lmms-eval's EvalAIAnswerProcessor and vlm.eval.metrics are separate implementations of the VQA rules."""
    from vlm.eval.lmms_task import process_results

    doc = {"answers": list(references)}
    assert process_results(doc, [prediction])["vqa_accuracy"] == pytest.approx(vqa_accuracy(prediction, references))


def test_a_missing_data_file_is_one_line_naming_it(trained_run, tmp_path):
    done = lmms_eval(["--model", "vlm", "--model_args", f"pretrained={trained_run / 'final'}", "--tasks", TASK,
                      "--include_path", str(TASKS_DIR), "--limit", "1", "--output_path", str(tmp_path)],
                     tmp_path / "nowhere.json", timeout=300)
    assert f"data file '{tmp_path / 'nowhere.json'}' not found; set {DATA_ENV}=FILE" in done.stdout + done.stderr
    assert not list(tmp_path.rglob("*_results.json"))  # lmms-eval logs the error and exits 0: no results


def test_loglikelihood_ranks_the_generated_answer_first(trained_run, synthetic):
    """In-process, with lmms-eval's own request objects: each greedy answer is greedy by loglikelihood, and
    a different answer to the same question scores lower."""
    from lmms_eval.api.instance import Instance

    from vlm.eval.lmms import VLMLmms
    from vlm.eval.lmms_task import doc_to_text, doc_to_visual, vqa_docs

    docs = vqa_docs(str(synthetic["test"]))[:3]
    lm = VLMLmms(pretrained=str(trained_run / "final"), batch_size=3, device="cpu")
    lm.task_dict = {TASK: {"test": docs}}

    def request(kind: str, i: int, second) -> Instance:
        return Instance(kind, (doc_to_text(docs[i]), second, doc_to_visual, i, TASK, "test"), idx=0,
                        metadata={"task": TASK, "doc_id": i, "repeats": 1})

    greedy = lm.generate_until([request("generate_until", i, {"max_new_tokens": 8, "until": []}) for i in range(3)])
    others = [next(a for a in ("blue", "triangle", "7", "left") if a != greedy[i]) for i in range(3)]
    chosen = lm.loglikelihood([request("loglikelihood", i, greedy[i]) for i in range(3)])
    rejected = lm.loglikelihood([request("loglikelihood", i, others[i]) for i in range(3)])
    assert [is_greedy for _, is_greedy in chosen] == [True] * 3, (greedy, chosen)
    assert [is_greedy for _, is_greedy in rejected] == [False] * 3, (others, rejected)
    assert all(c[0] > r[0] for c, r in zip(chosen, rejected)), (chosen, rejected)
