"""Build and briefly pre-train the tiny ViT and Llama used when nothing can be downloaded."""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from vlm.embedded.tiny_backbones import make_tiny_backbones


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="writes OUT/vit (timm), OUT/siglip and OUT/lm (transformers)")
    parser.add_argument("--vit-steps", type=int, default=800)
    parser.add_argument("--lm-steps", type=int, default=250)
    parser.add_argument("--siglip-steps", type=int, default=None, help="default: min(vit steps, 40)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    # fp32 on every core this process may use (2 on the reference machine), unless OMP_NUM_THREADS says otherwise.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or len(os.sched_getaffinity(0)))
    t0 = time.perf_counter()
    paths = make_tiny_backbones(args.out, args.vit_steps, args.lm_steps, args.seed, args.siglip_steps)
    report = json.loads((paths["vit"].parent / "pretraining.json").read_text())
    vit, lm = report["vit"], report["lm"]
    print(f"vit -> {paths['vit']} ({vit['seconds']}s, loss {vit['first_loss']:.3f} -> {vit['final_loss']:.3f})")
    for kind, acc in vit["heldout_accuracy"].items():
        print(f"  held-out accuracy ({kind}): " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    print(
        f"lm  -> {paths['lm']} ({lm['seconds']}s, vocab {lm['vocab_size']}, log(vocab) {lm['log_vocab']:.2f}, "
        f"held-out loss {lm['heldout_loss_before']:.3f} -> {lm['heldout_loss']:.3f})"
    )
    siglip = report["siglip"]
    probe = ", ".join(f"{k} {v:.3f}" for k, v in siglip["heldout_accuracy"]["patch_probe"].items())
    print(f"siglip -> {paths['siglip']} ({siglip['seconds']}s, {siglip['steps']} steps; held-out patch probe: {probe})")
    print(f"total {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
