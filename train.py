"""Thin entry: `python train.py CONFIG.yaml [key=value ...]`, also under `accelerate launch` / `torchrun`."""

import sys

from vlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
