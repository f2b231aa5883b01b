"""`vlm train | predict | eval | serve | chat | export | push | data check`: the command-line entry points."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .config import ConfigError, load_config
from .data.sample import DataError


def _train(args: argparse.Namespace) -> int:
    from .train import train

    config = load_config(args.config, args.overrides)
    train(config)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .eval.predict import predict
    from .factory import load

    model, processor = load(args.model)
    count = predict(model, processor, args.data, args.out, args.image_root, args.max_new_tokens, args.batch_size,
                    image_drop=args.image_drop, seed=args.seed, dropped_image=args.dropped_image)
    print(f"Wrote {count} predictions to {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .eval.predict import evaluate_predictions

    if args.retention:
        from .eval.retention import base_model, retention
        from .factory import load

        model, processor = load(args.retention)
        print(json.dumps(retention(model, base_model(model), processor, max_new_tokens=args.max_new_tokens), indent=2))
        return 0
    if not args.predictions or not args.data:
        print("vlm eval needs --predictions FILE and --data FILE (or --retention MODEL_DIR).", file=sys.stderr)
        return 2
    print(json.dumps(evaluate_predictions(args.predictions, args.data), indent=2))
    return 0


def _bench_fusion(args: argparse.Namespace) -> int:
    from .bench.fusion import bench_fusion

    def items(text: str) -> list[str]:
        return [s.strip() for s in text.split(",") if s.strip()]

    if args.merge:
        from .bench.fusion import merge_results

        rows = merge_results(args.merge, args.out)
        print((Path(args.out) / "results.md").read_text())
        return 0 if all(row["status"] == "ok" for row in rows) else 1
    if not args.config:
        raise ValueError("vlm bench fusion needs --config (or --merge).")
    seeds = [int(s) for s in items(args.seeds)] if "," in args.seeds else int(args.seeds)
    rows = bench_fusion(
        args.config, args.out, items(args.strategies), items(args.regimes), [float(d) for d in items(args.dropout)],
        seeds, args.max_steps, args.budget, args.eval_every, args.patience, args.min_delta,
        args.train_batch_size, args.train_images,
        args.eval_images, args.test_images, not args.no_text_only, args.overrides, args.max_new_tokens,
        args.batch_size, dropped_images=items(args.dropped_image), calibrate=args.calibrate or [],
        conditions=items(args.conditions) if args.conditions else None,
        corruptions=[float(c) for c in items(args.image_corruption)], image_size=args.image_size,
        image_aspect=args.image_aspect,
    )
    print((Path(args.out) / "results.md").read_text())
    return 0 if all(row["status"] == "ok" for row in rows) else 1


def _data_check(args: argparse.Namespace) -> int:
    from .data.check import check_data
    from .factory import build_processor

    processor, image_root, data = None, args.image_root, None
    if args.config:
        config = load_config(args.config)
        processor = build_processor(config.model, config.data)
        image_root, data = image_root or config.data.image_root, config.data
    started = time.perf_counter()
    report = check_data(args.files, processor, image_root, data, workers=args.workers)
    seconds = time.perf_counter() - started
    print(report.render())
    print(f"checked {report.samples} samples in {seconds:.1f}s ({report.samples / max(seconds, 1e-9):.0f} samples/s, "
          f"{args.workers} worker(s))")
    return 1 if report.failed else 0


def _export(args: argparse.Namespace) -> int:
    from .factory import load, processor_for, save
    from .hub.export import ExportError, export_llava_hf

    if args.merge_lora:
        from .train.lora import adapter_max_tiles, load_adapter_folder, merge_lora

        model = merge_lora(load_adapter_folder(args.model))
        processor = processor_for(model, max_tiles=adapter_max_tiles(args.model))
        if args.format is None:
            save(model, processor, args.out)
            print(f"Wrote a VLM folder with the LoRA adapters merged into the LM to {args.out}")
            return 0
    elif args.format is None:
        print("Nothing to do: pass --format llava-hf and/or --merge-lora.", file=sys.stderr)
        return 2
    else:
        model, processor = load(args.model)
    try:
        out = export_llava_hf(model, processor, args.out)
    except ExportError as err:
        print(f"Cannot export: {err}", file=sys.stderr)
        return 2
    print(f"Wrote a transformers LlavaForConditionalGeneration checkpoint to {out}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from .hub.push import PushError, push_folder

    try:
        url = push_folder(
            args.model, args.repo_id, args.private, args.revision, args.commit_message, args.endpoint
        )
    except PushError as err:
        print(f"Cannot push: {err}", file=sys.stderr)
        return 2
    print(f"Pushed {args.model} to {args.repo_id}" + (f" (branch {args.revision})" if args.revision else "") + f": {url}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import os

    from .serve import Limits, VLMServer

    limits = Limits(
        max_body_bytes=args.max_body_bytes, max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels, max_images=args.max_images, max_tokens=args.max_tokens_limit,
        image_folder=Path(args.allow_images_from) if args.allow_images_from else None,
    )
    api_key = args.api_key or os.environ.get("VLM_API_KEY") or None
    try:
        server = VLMServer(args.model, args.host, args.port, limits, api_key, args.max_batch, args.batch_wait_ms,
                           args.max_new_tokens)
    except OSError as err:
        print(f"Cannot serve {args.model} on {args.host}:{args.port}: {err.strerror or err}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"Warning: listening on {args.host} without --api-key: anyone who reaches it can use the model.")
    info = server.describe()
    print(f"Serving {info['id']} (fusion: {info['fusion']}, vision: {info['vision']}, LM: {info['lm']})", flush=True)
    if args.command == "chat":
        print(f"Chat page: {server.url}/", flush=True)
        if args.open:
            import webbrowser

            webbrowser.open(f"{server.url}/")
    print(f"OpenAI-compatible API: {server.url}/v1 (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a saved VLM folder (e.g. output_dir/final)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; only this machine by default")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' (or set VLM_API_KEY, which stays out of `ps`)")
    parser.add_argument("--allow-images-from", default=None, metavar="FOLDER",
                        help="let requests name image files inside FOLDER; by default only data: URLs are read")
    parser.add_argument("--max-batch", type=int, default=16, help="most requests in one generate call")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a request waits for others")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="max_tokens of a request that sets none")
    parser.add_argument("--max-tokens-limit", type=int, default=512, help="largest max_tokens a request may ask")
    parser.add_argument("--max-body-bytes", type=int, default=20 * 1024 * 1024)
    parser.add_argument("--max-image-bytes", type=int, default=10 * 1024 * 1024)
    parser.add_argument("--max-image-pixels", type=int, default=16_777_216, help="checked before decoding")
    parser.add_argument("--max-images", type=int, default=8, help="most images in one request")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a VLM from a YAML config")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 train.max_steps=100")
    train.set_defaults(run=_train)

    predict = commands.add_parser("predict", help="answer the last user turn of every sample")
    predict.add_argument("--model", required=True, help="a saved VLM folder (e.g. output_dir/final)")
    predict.add_argument("--data", required=True, help="LLaVA JSON / messages JSONL file")
    predict.add_argument("--image-root", default=None, help="folder image paths are relative to")
    predict.add_argument("--out", required=True, help="predictions JSONL to write")
    predict.add_argument("--max-new-tokens", type=int, default=32)
    predict.add_argument("--batch-size", type=int, default=16)
    predict.add_argument("--image-drop", type=float, default=0.0,
                         help="drop each image (and its <image> tag) with this probability, to test missing images")
    predict.add_argument("--seed", type=int, default=0, help="seed of the --image-drop draws")
    predict.add_argument("--dropped-image", choices=("remove", "blank"), default="remove",
                         help="where a dropped image goes: removed with its tag, or a blank grey image in its place")
    predict.set_defaults(run=_predict)

    serve = commands.add_parser("serve", help="OpenAI-compatible chat-completions server with dynamic batching")
    _serve_arguments(serve)
    serve.set_defaults(run=_serve)

    chat = commands.add_parser("chat", help="chat with a model in the browser (images, multi-turn, streaming)")
    _serve_arguments(chat)
    chat.add_argument("--open", action="store_true", help="also open the page in this machine's browser")
    chat.set_defaults(run=_serve)

    evaluate = commands.add_parser("eval", help="score predictions: VQA accuracy, BLEU-4, CIDEr-D; or --retention")
    evaluate.add_argument("--predictions")
    evaluate.add_argument("--data")
    evaluate.add_argument("--retention", metavar="MODEL_DIR",
                          help="how much text-only chat a saved VLM kept: 120 prompts against its base LM")
    evaluate.add_argument("--max-new-tokens", type=int, default=32, help="with --retention: reply length cap")
    evaluate.set_defaults(run=_eval)

    export = commands.add_parser("export", help="export to a transformers-native format")
    export.add_argument("--model", required=True, help="a saved VLM folder (a LoRA adapter folder with --merge-lora)")
    export.add_argument("--format", choices=["llava-hf"], help="target format; without it, --merge-lora writes a VLM folder")
    export.add_argument("--merge-lora", action="store_true", help="merge a LoRA adapter folder's adapters into the LM")
    export.add_argument("--out", required=True)
    export.set_defaults(run=_export)

    push = commands.add_parser("push", help="upload a saved VLM folder (with a model card) to a model hub")
    push.add_argument("--model", required=True, help="a saved VLM folder (e.g. output_dir/final)")
    push.add_argument("--repo-id", required=True, help="ORG/NAME (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--revision", default=None, help="branch to push to (created if missing); default main")
    push.add_argument("--commit-message", default="Upload VLM")
    push.add_argument("--endpoint", default=None, help="hub URL; default HF_ENDPOINT, then huggingface.co")
    push.set_defaults(run=_push)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    fusion = bench.add_parser("fusion", help="train and compare fusion strategies; missing and corrupted images")
    fusion.add_argument("--config", help="YAML config every job starts from (backbones, lr)")
    fusion.add_argument("--out", required=True, help="folder for results.md / results.csv / plots, data and runs")
    fusion.add_argument("--strategies", default="early,projector,resampler,cross_attention,late",
                        help="fusion strategies or named variants (vlm/bench/fusion.py: STRATEGY_OVERRIDES)")
    fusion.add_argument("--regimes", default="finetune", help="what trains: align, finetune, lora (comma-separated)")
    fusion.add_argument("--dropout", default="0,0.3", help="training image-dropout rates (comma-separated)")
    fusion.add_argument("--dropped-image", default="remove",
                        help="where a dropped image goes: remove, blank, or both (comma-separated); blank rows "
                             "are named <strategy>+blank and also see a blank image in the no-image tests")
    fusion.add_argument("--image-corruption", default="0",
                        help="shares of training images corrupted at random, ModDrop-style (comma-separated); "
                             "rows above 0 are named <strategy>+corrupt<p> and run the tower (no feature cache)")
    fusion.add_argument("--conditions", default=None,
                        help="test only these conditions (comma-separated, with clean and no_image); default all 13")
    fusion.add_argument("--calibrate", nargs="+", default=None, metavar="DIR",
                        help="earlier bench folders whose measured job times make the time estimate")
    fusion.add_argument("--seeds", default="1", help="N: seeds 0..N-1 per job (mean +- std); or a list: 1,2 (one seed: 3,)")
    fusion.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                        help="only rewrite the results of these bench folders as one, into --out")
    fusion.add_argument("--max-steps", type=int, default=400, help="step cap of early stopping")
    fusion.add_argument("--budget", type=int, default=200, help="the equal step budget every job is scored at")
    fusion.add_argument("--eval-every", type=int, default=50, help="eval-loss interval for early stopping")
    fusion.add_argument("--patience", type=int, default=2, help="evaluations without improvement before stopping")
    fusion.add_argument("--min-delta", type=float, default=0.005, help="eval-loss drop that counts as improvement")
    fusion.add_argument("--train-batch-size", type=int, default=8)
    fusion.add_argument("--train-images", type=int, default=2000)
    fusion.add_argument("--eval-images", type=int, default=100)
    fusion.add_argument("--test-images", type=int, default=50, help="test scenes (about 8 questions each)")
    fusion.add_argument("--image-size", type=int, default=64, help="height of the rendered images in pixels")
    fusion.add_argument("--image-aspect", type=float, default=1.0,
                        help="width / height of the rendered images (e.g. 2, with data.tiling.max_tiles=2 "
                             "data.cache_features=false, for aspect-preserving tiles)")
    fusion.add_argument("--no-text-only", action="store_true", help="skip the text-only and base-LM baselines")
    fusion.add_argument("--max-new-tokens", type=int, default=4)
    fusion.add_argument("--batch-size", type=int, default=64, help="evaluation batch size")
    fusion.add_argument("overrides", nargs="*", help="dotted config overrides applied to every job")
    fusion.set_defaults(run=_bench_fusion)

    data = commands.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    check = data.add_parser("check", help="read every sample as training would and report problems")
    check.add_argument("files", nargs="+", help="data files or dataset folders (any format training reads)")
    check.add_argument("--config", help="training config: adds chat-template tokenisation and length checks")
    check.add_argument("--image-root", default=None, help="folder image paths are relative to")
    check.add_argument("--workers", type=int, default=1, help="processes that decode and tokenise samples")
    check.set_defaults(run=_data_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as err:
        print(f"Config error: {err}", file=sys.stderr)
        return 2
    except DataError as err:  # an unreadable data file, or a bad sample under data.strict
        print(f"Data error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
