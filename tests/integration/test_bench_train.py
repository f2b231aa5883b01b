"""`scripts/bench_train.py` runs end to end (two steps, tiny sizes, CPU); the speed target is the benchmark's
to report, not this test's."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_train_prints_both_models_a_ratio_and_a_passed_loss_match():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--steps", "2", "--warmup", "1",
         "--batch-size", "4", "--threads", "2"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-3000:]
    for stage in ("align", "finetune"):
        row = r"\s+([\d,]+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)"  # trainable, ms/step, tokens/s, images/s
        rows = {m: re.search(rf"^{stage}\s+{m}{row}", out, re.M) for m in ("ours", "llava-hf")}
        assert all(rows.values()), out
        assert rows["ours"].group(1) == rows["llava-hf"].group(1)  # the same parameters train
        assert all(float(r.group(2)) > 0 and int(r.group(3)) > 0 for r in rows.values())
        ratio = re.search(rf"^{stage}\s+ratio ours/llava-hf step time: ([\d.]+)", out, re.M)
        assert ratio and float(ratio.group(1)) > 0, out
        assert re.search(rf"^{stage}\s+loss match: .*PASSED$", out, re.M), out
    assert "align" in out and "61,824" in out  # align trains the projector only (tiny sizes: 61,824 weights)
