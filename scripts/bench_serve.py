"""Throughput of `vlm serve` with dynamic batching against the same server answering one request at a time.

Both servers run in this process on free loopback ports, each with its own copy of the model; the same
concurrent clients send the same requests (non-streaming, greedy) to each, alternately, for --rounds
rounds. Answers must be equal across the two (batching must not change them). Prints one line per run
and a summary; --out writes it as JSON.

    python scripts/bench_serve.py --model artifacts/quickstart/run/final --data artifacts/quickstart/data/test.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm.data.formats import read_samples  # noqa: E402
from vlm.serve import VLMServer  # noqa: E402
from vlm.serve.api import openai_messages  # noqa: E402


def run(url: str, bodies: list[bytes], clients: int) -> tuple[float, list[str], int]:
    """Seconds to answer every body with `clients` concurrent connections; the answers; completion tokens."""
    def ask(body: bytes) -> dict:
        request = urllib.request.Request(f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        replies = list(pool.map(ask, bodies))
    seconds = time.perf_counter() - start
    return seconds, [r["choices"][0]["message"]["content"] for r in replies], sum(r["usage"]["completion_tokens"] for r in replies)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="artifacts/quickstart/run/final")
    parser.add_argument("--data", default="artifacts/quickstart/data/test.json")
    parser.add_argument("--only", default="caption", help="use the samples whose id contains this ('' for all)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    samples, _ = read_samples(args.data, image_root=None)
    samples = [s for s in samples if args.only in s.id]
    samples = [samples[i % len(samples)] for i in range(args.requests)]
    bodies = [json.dumps({"model": "vlm", "messages": openai_messages(s), "max_tokens": args.max_tokens}).encode()
              for s in samples]
    servers = {"batched": VLMServer(args.model, port=0, max_batch=args.max_batch).start(),
               "one_at_a_time": VLMServer(args.model, port=0, max_batch=1).start()}
    run(servers["batched"].url, bodies[:4], 2)  # warm-up: first calls allocate
    run(servers["one_at_a_time"].url, bodies[:4], 2)
    results: dict[str, list[float]] = {name: [] for name in servers}
    answers: dict[str, list[str]] = {}
    tokens = 0
    for round_ in range(args.rounds):
        order = list(servers) if round_ % 2 == 0 else list(servers)[::-1]
        for name in order:
            seconds, answers[name], tokens = run(servers[name].url, bodies, args.clients)
            results[name].append(args.requests / seconds)
            print(f"round {round_ + 1} {name:>13}: {args.requests} requests in {seconds:.2f} s = "
                  f"{args.requests / seconds:.2f} req/s, {tokens / seconds:.1f} tokens/s", flush=True)
    sizes = servers["batched"].batcher.batch_sizes
    for server in servers.values():
        server.close()
    ratios = [b / o for b, o in zip(results["batched"], results["one_at_a_time"])]
    summary = {
        "requests": args.requests, "clients": args.clients, "max_tokens": args.max_tokens,
        "completion_tokens_per_run": tokens, "req_per_s": {k: [round(v, 2) for v in vs] for k, vs in results.items()},
        "speedup_per_round": [round(r, 2) for r in ratios], "speedup_median": round(statistics.median(ratios), 2),
        "mean_batch_size": round(sum(sizes) / len(sizes), 1), "answers_equal": answers["batched"] == answers["one_at_a_time"],
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["answers_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
