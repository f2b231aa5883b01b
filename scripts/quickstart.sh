#!/usr/bin/env bash
# The embedded default end to end: backbones -> data -> train -> predict -> eval.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ROOT=artifacts/quickstart
export TOKENIZERS_PARALLELISM=false
start=$SECONDS

$PY scripts/make_tiny_backbones.py --out "$ROOT/backbones"
$PY scripts/make_synthetic_data.py --out "$ROOT/data"
$PY train.py configs/quickstart.yaml
$PY -m vlm.cli predict --model "$ROOT/run/final" --data "$ROOT/data/test.json" \
    --out "$ROOT/run/predictions.jsonl" --max-new-tokens 24 --batch-size 32
$PY -m vlm.cli eval --predictions "$ROOT/run/predictions.jsonl" --data "$ROOT/data/test.json" \
    | tee "$ROOT/run/metrics.json"

$PY - "$ROOT" <<'PYTHON'
import json, sys
root = sys.argv[1]
tests = {s["id"]: s for s in json.load(open(f"{root}/data/test.json"))}
preds = [json.loads(line) for line in open(f"{root}/run/predictions.jsonl")]
captions = [p for p in preds if tests[p["id"]].get("type") == "caption"][:5]
print("\nGenerated captions (prediction | reference):")
for p in captions:
    print(f"  {p['prediction']!r:45} | {tests[p['id']]['answers'][0]!r}")
metrics = json.load(open(f"{root}/run/metrics.json"))
print(f"\nVQA accuracy on {metrics['vqa']['count']} synthetic test questions: {metrics['vqa']['accuracy']:.1%}")
PYTHON
echo "Quickstart wall time: $((SECONDS - start)) s"
