"""Align-stage step time (data loading included) with and without the frozen-feature cache, in one run.

Uses the quickstart's backbones and data (run `make quickstart` first, or pass --config).
Both modes train the same model from the same state on the same batches; blocks of steps
alternate between them so machine noise hits both alike. Prints seconds per step, the
speed-up, and the largest loss difference.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch

from vlm.config import load_config
from vlm.data.dataset import ConversationDataset
from vlm.data.feature_cache import FeatureCache, encoder_fingerprint
from vlm.data.formats import read_samples
from vlm.factory import build
from vlm.train.freezing import apply_stage
from vlm.train.batches import make_loader
from vlm.train.optim import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=60, help="steps per mode")
    parser.add_argument("--block", type=int, default=10, help="steps per alternation block")
    args = parser.parse_args()

    config = load_config(args.config, ["train.stage=align"])
    torch.manual_seed(0)
    model, processor = build(config.model, config.data)
    apply_stage(model, "align")
    samples = read_samples(config.data.train_files[0], config.data.image_root)[0]
    vision = model.vision
    with tempfile.TemporaryDirectory() as root:
        cache = FeatureCache(root, encoder_fingerprint(vision), (vision.num_patches, vision.hidden_size))
        started = time.perf_counter()
        cache.fill(samples, processor, vision, batch_size=64)
        fill_seconds = time.perf_counter() - started
        modes = {}
        for name, feature_cache in (("recompute", None), ("cached", cache)):
            dataset = ConversationDataset(samples, processor, feature_cache=feature_cache)
            replica = copy.deepcopy(model)
            modes[name] = {
                "model": replica, "optimizer": build_optimizer(replica, config),
                "batches": iter(make_loader(dataset, model.tokenizer.pad_token_id, config.train.batch_size, True, config)),
                "seconds": 0.0, "losses": [],
            }
        for _ in range(args.steps // args.block):
            for mode in modes.values():
                for _ in range(args.block):
                    started = time.perf_counter()  # data loading included: the cache skips image decoding too
                    batch = next(mode["batches"])
                    loss = mode["model"](**batch.model_inputs()).loss
                    loss.backward()
                    mode["optimizer"].step()
                    mode["optimizer"].zero_grad(set_to_none=True)
                    mode["seconds"] += time.perf_counter() - started
                    mode["losses"].append(loss.item())
    recompute, cached = modes["recompute"], modes["cached"]
    steps = len(cached["losses"])
    diff = max(abs(a - b) for a, b in zip(recompute["losses"], cached["losses"]))
    print(f"batch size {config.train.batch_size}, {steps} align steps per mode, {torch.get_num_threads()} threads")
    print(f"cache fill (first epoch's extra work): {fill_seconds:.1f}s for {len(samples)} images")
    print(f"recompute: {recompute['seconds'] / steps * 1000:.1f} ms/step")
    print(f"cached:    {cached['seconds'] / steps * 1000:.1f} ms/step")
    print(f"speed-up:  {recompute['seconds'] / cached['seconds']:.2f}x   max loss difference: {diff:.2e}")


if __name__ == "__main__":
    main()
