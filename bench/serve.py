"""Serving benchmark: N streaming requests at concurrency C against any OpenAI-compatible server.

Reports request/s, output tok/s, TTFT, inter-token latency (ITL) and end-to-end latency p50/p90/p99 as a table
and JSON; `--plot` draws throughput and latency against concurrency. Tokens are counted from the usage that
`stream_options.continuous_usage_stats` puts on every chunk, so a chunk carrying two tokens counts two; from a server
that sends usage only with its last event (llama.cpp's llama-server), from each event's `timings.predicted_n`
(`--extra-body '{"timings_per_token": true}'` asks llama-server for it).

  python bench/serve.py --url http://127.0.0.1:8000 --concurrency 1,8,32 --num-requests 64 \
      --prompt-len 64 --output-len 64 --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import statistics
import sys
import time
from typing import Any

import httpx


@dataclasses.dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = dataclasses.field(default_factory=list)
    error: str = ""


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "mean": statistics.fmean(ordered)}


def tokens_so_far(chunk: dict[str, Any], seen: int) -> int:
    """Output tokens a stream has carried up to and including `chunk` (`seen` before it)."""
    usage = chunk.get("usage") or {}
    if "completion_tokens" in usage:
        return int(usage["completion_tokens"])
    timings = chunk.get("timings") or {}
    return int(timings.get("predicted_n", seen))


async def one_request(client: httpx.AsyncClient, model: str | None, prompt: list[int], output_len: int,
                      ignore_eos: bool, extra_body: dict[str, Any]) -> RequestResult:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "stream": True,
                            "ignore_eos": ignore_eos,
                            "stream_options": {"include_usage": True, "continuous_usage_stats": True}, **extra_body}
    if model:
        body["model"] = model
    start = time.perf_counter()
    result = RequestResult(ok=False)
    last = start
    seen = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as reply:
            if reply.status_code != 200:
                result.error = f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}"
                return result
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                tokens = tokens_so_far(chunk, seen)
                if tokens > seen:
                    now = time.perf_counter()
                    if seen == 0:
                        result.ttft = now - start
                    else:
                        # Tokens that arrive together share the gap since the previous chunk.
                        result.itls += [(now - last) / (tokens - seen)] * (tokens - seen)
                    last = now
                    seen = tokens
                result.prompt_tokens = (chunk.get("usage") or {}).get("prompt_tokens", result.prompt_tokens)
        result.output_tokens = seen
        result.e2e = time.perf_counter() - start
        result.ok = True
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def progress(done: int, total: int, label: str) -> None:
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


async def run_level(url: str, model: str | None, concurrency: int, prompts: list[list[int]], output_len: int,
                    ignore_eos: bool, api_key: str | None, request_rate: float | None,
                    extra_body: dict[str, Any] | None = None) -> dict[str, Any]:
    """All prompts at one concurrency (or a Poisson request rate); returns the summary."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4)
    results: list[RequestResult] = []
    gate = asyncio.Semaphore(concurrency)
    rng = random.Random(0)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), headers=headers,
                                 limits=limits) as client:
        async def worker(prompt: list[int]) -> None:
            async with gate:
                results.append(await one_request(client, model, prompt, output_len, ignore_eos, extra_body or {}))
                progress(len(results), len(prompts), f"concurrency {concurrency:4d}")

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.ensure_future(worker(prompt)))
            if request_rate:
                await asyncio.sleep(rng.expovariate(request_rate))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in ok)
    return {
        "concurrency": concurrency, "request_rate": request_rate, "num_requests": len(results),
        "failed": len(results) - len(ok), "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": elapsed, "requests_per_s": len(ok) / elapsed, "output_tokens": output,
        "output_tok_per_s": output / elapsed,
        "total_tok_per_s": (output + sum(r.prompt_tokens for r in ok)) / elapsed,
        "ttft_s": percentiles([r.ttft for r in ok]), "itl_s": percentiles([x for r in ok for x in r.itls]),
        "e2e_s": percentiles([r.e2e for r in ok]),
    }


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    # Ids above the special tokens, so a prompt is plain text to the model.
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(count)]


def print_table(levels: list[dict[str, Any]]) -> None:
    head = (f"{'conc':>5} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} {'p90':>7} {'p99':>7} "
            f"{'ITL p50':>8} {'p90':>7} {'p99':>7} {'E2E p50':>8} {'p99':>7} {'fail':>5}")
    print(head)
    for r in levels:
        t, i, e = r["ttft_s"], r["itl_s"], r["e2e_s"]
        print(f"{r['concurrency']:>5} {r['requests_per_s']:>7.2f} {r['output_tok_per_s']:>10.1f} "
              f"{t['p50']:>9.3f} {t['p90']:>7.3f} {t['p99']:>7.3f} {i['p50'] * 1e3:>6.1f}ms {i['p90'] * 1e3:>5.0f}ms "
              f"{i['p99'] * 1e3:>5.0f}ms {e['p50']:>8.2f} {e['p99']:>7.2f} {r['failed']:>5}")


def plot(levels: list[dict[str, Any]], path: str, baseline_tok_s: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = [r["concurrency"] for r in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(conc, [r["output_tok_per_s"] for r in levels], "o-", label="this server")
    if baseline_tok_s:
        left.axhline(baseline_tok_s, color="gray", linestyle="--", label="one-at-a-time generate()")
    left.set(xscale="log", xlabel="concurrency", ylabel="output tokens/s", title="Throughput")
    left.set_xticks(conc, [str(c) for c in conc])
    left.legend()
    for key, label in (("ttft_s", "TTFT p50"), ("itl_s", "ITL p50"), ("e2e_s", "E2E p50")):
        right.plot(conc, [r[key]["p50"] for r in levels], "o-", label=label)
    right.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="seconds", title="Latency")
    right.set_xticks(conc, [str(c) for c in conc])
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model name to send (default: the server's)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--concurrency", default="1,8,32,64", help="comma-separated levels")
    parser.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second instead")
    parser.add_argument("--num-requests", type=int, default=None, help="per level (default: 2 x concurrency, >= 8)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--no-ignore-eos", action="store_true", help="let EOS end requests early")
    parser.add_argument("--extra-body", type=json.loads, default={},
                        help="a JSON object merged into every request, e.g. a server's own fields")
    parser.add_argument("--vocab-size", type=int, default=49152)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--plot", default=None, help="write a PNG of throughput and latency vs concurrency")
    args = parser.parse_args(argv)
    levels = []
    for level in (int(c) for c in args.concurrency.split(",")):
        count = args.num_requests or max(8, 2 * level)
        prompts = random_prompts(count, args.prompt_len, args.vocab_size, args.seed + level)
        levels.append(asyncio.run(run_level(args.url, args.model, level, prompts, args.output_len,
                                            not args.no_ignore_eos, args.api_key, args.request_rate,
                                            args.extra_body)))
    print_table(levels)
    report = {"url": args.url, "prompt_len": args.prompt_len, "output_len": args.output_len, "levels": levels}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        plot(levels, args.plot)
    return report


if __name__ == "__main__":
    main()
