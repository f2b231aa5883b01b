"""Render the synthetic coloured-shapes VQA dataset (the quickstart's embedded default data)."""

from __future__ import annotations

import argparse
import json
import time

from vlm.embedded.evidence import make_evidence_dataset
from vlm.embedded.synthetic import make_synthetic_dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="output folder (images/ and train/eval/test.json)")
    parser.add_argument("--train", type=int, default=4000, help="training images (multi-turn conversations)")
    parser.add_argument("--eval", type=int, default=200, help="evaluation images (multi-turn conversations)")
    parser.add_argument("--test", type=int, default=200, help="test images (one sample per question)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evidence", action="store_true",
                        help="the evidence-bearing variant (text notes; test items labelled by evidence source)")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    make = make_evidence_dataset if args.evidence else make_synthetic_dataset
    paths = make(args.out, args.train, args.eval, args.test, args.image_size, args.seed)
    for split, path in paths.items():
        samples = json.loads(path.read_text())
        print(f"{split}: {len(samples)} samples -> {path}")
    print(f"wrote {args.train + args.eval + args.test} images in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
