"""Per-token decode time of `fusion: cross_attention` with the visual K/V cached per prompt vs
recomputed from the visual tokens at every decode step (and the bare LM for reference).

    python scripts/bench_cross_attention.py [--batch 4] [--images 2] [--every-n 1] [--new-tokens 128]

Builds untrained tiny backbones in a temporary folder; CPU, one thread unless --threads.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from vlm.config import ModelConfig
from vlm.data.collator import Collator
from vlm.data.sample import Sample
from vlm.factory import processor_for
from vlm.model import VLM
from vlm.image_positions import ImagePositions
from vlm.embedded.tiny_backbones import make_tiny_backbones


def decode_seconds_per_token(run, new_tokens: int, repeats: int) -> float:
    """(time for new_tokens - time for 1 token) / (new_tokens - 1): the prefill cancels out; best of repeats."""
    def best(n: int) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(n)
            times.append(time.perf_counter() - t0)
        return min(times)

    return (best(new_tokens) - best(1)) / (new_tokens - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--images", type=int, default=2, help="images per sample")
    parser.add_argument("--every-n", type=int, default=1, help="model.cross_attention.every_n_layers")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_tiny_backbones(Path(tmp), vit_steps=0, lm_steps=0)
        config = ModelConfig(vision=str(paths["vit"]), lm=str(paths["lm"])).with_fusion(
            "cross_attention", every_n_layers=args.every_n)
        torch.manual_seed(0)
        model = VLM.from_config(config).eval()
        with torch.no_grad():
            for block in model.fusion.blocks.values():
                block.attn_gate.fill_(1.0)
                block.ffn_gate.fill_(1.0)
        text = " ".join(["<image> what is here?"] * args.images)
        samples = [
            Sample(f"s{i}", [{"role": "user", "content": text}],
                   [Image.new("RGB", (64, 64), (40 * i, 30 * j, 200)) for j in range(args.images)])
            for i in range(args.batch)
        ]
        encoded = [processor_for(model)(s, for_generation=True) for s in samples]
        batch = Collator(model.tokenizer.pad_token_id, "left")(encoded)
        ids, mask = batch.input_ids, batch.attention_mask
        with torch.no_grad():
            embeds, features = model.embed(ids, batch.pixel_values)

        def vlm(cache_visual_kv: bool):
            def run(n: int) -> torch.Tensor:
                return model.fusion.lm_generate(
                    model.lm, inputs_embeds=embeds, attention_mask=mask, image_features=features,
                    images=ImagePositions.of_batch(ids == model.image_token_id), cache_visual_kv=cache_visual_kv,
                    max_new_tokens=n, min_new_tokens=n, do_sample=False,
                )
            return run

        def lm_only(n: int) -> torch.Tensor:
            return model.lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n,
                                     min_new_tokens=n, do_sample=False)

        with torch.no_grad():
            assert torch.equal(vlm(True)(16), vlm(False)(16)), "cached and recomputed K/V must agree"
            results = {name: decode_seconds_per_token(fn, args.new_tokens, args.repeats)
                       for name, fn in (("bare LM", lm_only), ("recomputed K/V", vlm(False)),
                                        ("cached K/V", vlm(True)))}

    visual_tokens = args.images * model.fusion.num_visual_tokens
    print(f"batch {args.batch}, {args.images} image(s)/sample ({visual_tokens} visual tokens/sample), "
          f"{len(model.fusion.blocks)} gated block(s), lm_dim {model.fusion.lm_dim}, "
          f"{args.new_tokens} new tokens, {torch.get_num_threads()} thread(s)")
    for name, seconds in results.items():
        print(f"{name:>15}: {seconds * 1e3:7.2f} ms / decode step")
    ratio = results["cached K/V"] / results["recomputed K/V"]
    print(f"cached / recomputed: {ratio:.2f}; cross-attention cost over the bare LM: "
          f"cached {(results['cached K/V'] - results['bare LM']) * 1e3:.2f} ms, "
          f"recomputed {(results['recomputed K/V'] - results['bare LM']) * 1e3:.2f} ms per step")

if __name__ == "__main__":
    main()
