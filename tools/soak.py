"""A bounded soak: mixed traffic at a fixed concurrency for a fixed time, then health checks of the server.

Traffic: completions and chat, streaming and not, random prompt and output lengths, some n=2, some logprobs,
some seeded sampling, some stop strings, and a share of clients that disconnect midway (streams closed after
a few chunks, non-streaming requests abandoned after a random delay). Afterwards it checks:
  - zero 5xx (as clients saw them, and as the server's own customllm_http_requests counted them);
  - every completed request well formed: streams end with [DONE], one finish_reason per choice, usage
    consistent (total = prompt + completion; choices that hit the length limit have exactly max_tokens);
  - no request still running and every cache block free (customllm_num_requests_running == 0,
    customllm_kv_cache_usage_ratio == 0);
  - resident memory (VmRSS of --pid, or of the started server) grew under 5% from warm-up to the end;
  - seeded and greedy requests replayed at the end (non-streaming) give identical text. Exact in float32; a bf16
    server rounds a prompt that load split across steps (chunked prefill) differently, so a replay may differ.

  python tools/soak.py --url http://127.0.0.1:8000 --pid $(pgrep -f customllm-server) --duration 600
  python tools/soak.py --start-server --duration 600       # a tiny random model on a free port

tests/reliability/test_soak.py runs a short version of `run_soak` against an in-process server.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import httpx

# Run as `python tools/soak.py`, sys.path starts at tools/: put the repository root first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools._soak_checks import SoakReport, metric, plain_request, rss_kb, stream_request

WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards", "quietly",
         "hex", "every", "jovial", "kangaroo", "near", "old", "stone", "bridges", "under", "grey", "autumn", "skies",
         "and", "river", "keeps", "running", "café", "naïve", "東京", "🙂")
STOP_CANDIDATES = ("e", "the", "\n", ".", " a", "ing", "zzqx", "!", "on")


@dataclasses.dataclass
class SoakConfig:
    duration: float = 600.0
    concurrency: int = 32
    seed: int = 0
    disconnect_fraction: float = 0.2
    stream_fraction: float = 0.5
    seeded_fraction: float = 0.2
    stop_fraction: float = 0.2
    chat_fraction: float = 0.3
    max_prompt_tokens: int = 200
    max_output_tokens: int = 64
    warmup: float | None = None  # seconds before the memory baseline; default 20% of the duration
    max_replays: int = 48
    memory_pid: int | None = None  # whose VmRSS to watch; None = don't
    max_memory_growth: float = 0.05
    request_timeout: float = 120.0


@dataclasses.dataclass
class _Replay:
    path: str
    body: dict[str, Any]
    texts: list[str]



def _prompt(rng: random.Random, cfg: SoakConfig) -> str | list[int]:
    length = rng.randint(1, cfg.max_prompt_tokens)
    if rng.random() < 0.5:
        return [rng.randrange(1000) for _ in range(length)]  # ids every real vocabulary has
    return " ".join(rng.choice(WORDS) for _ in range(max(1, length * 3 // 4)))


def make_request(rng: random.Random, cfg: SoakConfig) -> tuple[str, dict[str, Any], bool]:
    """(path, body, replayable) of one random request."""
    max_tokens = rng.randint(1, cfg.max_output_tokens)
    body: dict[str, Any] = {"max_tokens": max_tokens}
    if rng.random() < cfg.chat_fraction:
        path = "/v1/chat/completions"
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, cfg.max_prompt_tokens // 2)))
        body["messages"] = [{"role": "user", "content": words}]
        if rng.random() < 0.1:
            body["logprobs"], body["top_logprobs"] = True, rng.randint(0, 5)
    else:
        path = "/v1/completions"
        body["prompt"] = _prompt(rng, cfg)
        if rng.random() < 0.1:
            body["logprobs"] = rng.randint(0, 5)
    seeded = rng.random() < cfg.seeded_fraction
    if seeded:
        body.update(temperature=rng.choice((0.7, 1.0)), top_p=rng.choice((1.0, 0.9)), seed=rng.randrange(2**31))
    else:
        body["temperature"] = rng.choice((0.0, 0.0, 1.0))
    if rng.random() < cfg.stop_fraction:
        body["stop"] = rng.sample(STOP_CANDIDATES, rng.randint(1, 3))
    if rng.random() < 0.1:
        body["n"] = 2
    if rng.random() < 0.3:
        body["ignore_eos"] = True
    replayable = seeded or body["temperature"] == 0.0
    return path, body, replayable



async def _one(client: httpx.AsyncClient, rng: random.Random, cfg: SoakConfig, report: SoakReport,
               replays: list[_Replay]) -> None:
    path, body, replayable = make_request(rng, cfg)
    stream = rng.random() < cfg.stream_fraction
    disconnect = rng.random() < cfg.disconnect_fraction
    report.started += 1
    report.streamed += stream
    report.seeded += "seed" in body
    report.with_stop += "stop" in body
    try:
        if stream:
            outcome = await stream_request(client, path, body, rng.randint(1, 8) if disconnect else None)
        else:
            outcome = await plain_request(client, path, body, rng.uniform(0.05, 1.0) if disconnect else None)
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        report.errors.append(f"{path} stream={stream}: {type(exc).__name__}: {exc}")
        return
    if outcome.status:
        report.statuses[outcome.status] = report.statuses.get(outcome.status, 0) + 1
    if outcome.cancelled:
        report.cancelled += 1
        return
    if outcome.problem is not None:
        report.errors.append(f"{path} stream={stream} {json.dumps(body)[:200]}: {outcome.problem}")
        return
    report.completed += 1
    report.completion_tokens += outcome.completion_tokens
    if replayable and outcome.texts is not None and len(replays) < cfg.max_replays:
        replays.append(_Replay(path, body, outcome.texts))


async def run_soak_async(base_url: str, cfg: SoakConfig) -> SoakReport:
    report = SoakReport(max_memory_growth=cfg.max_memory_growth)
    rng = random.Random(cfg.seed)
    replays: list[_Replay] = []
    warmup = cfg.warmup if cfg.warmup is not None else 0.2 * cfg.duration
    limits = httpx.Limits(max_connections=cfg.concurrency + 4, max_keepalive_connections=cfg.concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=cfg.request_timeout, limits=limits) as client:
        server_5xx_before = await metric(client, "customllm_http_requests_total", ("status", "5"))
        start = time.monotonic()
        end = start + cfg.duration
        warm_samples: list[int] = []
        end_samples: list[int] = []

        async def worker(worker_rng: random.Random) -> None:
            while time.monotonic() < end:
                await _one(client, worker_rng, cfg, report, replays)

        async def watch_memory() -> None:
            # Peak RSS in the second after warm-up vs. in the last tenth of the run: both windows carry the same
            # load, so in-flight buffers cancel out and what remains is growth.
            if cfg.memory_pid is None:
                return
            while time.monotonic() < end:
                now = time.monotonic() - start
                if warmup <= now < warmup + max(2.0, 0.05 * cfg.duration):
                    warm_samples.append(rss_kb(cfg.memory_pid))
                elif now >= 0.9 * cfg.duration and now > warmup + max(2.0, 0.05 * cfg.duration):
                    end_samples.append(rss_kb(cfg.memory_pid))
                await asyncio.sleep(0.25)

        workers = [worker(random.Random(rng.random())) for _ in range(cfg.concurrency)]
        await asyncio.gather(*workers, watch_memory())
        report.duration = time.monotonic() - start

        # Let aborts of the last disconnects reach the engine, then check it is idle and nothing is held.
        deadline = time.monotonic() + 30
        while True:
            report.running_after = (await metric(client, "customllm_num_requests_running")
                                    + await metric(client, "customllm_num_requests_waiting"))
            report.kv_usage_after = await metric(client, "customllm_kv_cache_usage_ratio")
            if (report.running_after == 0 and report.kv_usage_after == 0) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        if warm_samples and end_samples:
            report.rss_warm_kb, report.rss_end_kb = max(warm_samples), max(end_samples)
        if cfg.memory_pid is not None:
            report.rss_idle_kb = rss_kb(cfg.memory_pid)

        # Replays: the same seeded (or greedy) request alone must give the same text as under load.
        sem = asyncio.Semaphore(8)

        async def replay(item: _Replay) -> None:
            async with sem:
                reply = await client.post(item.path, json=item.body)
            if reply.status_code != 200:
                report.replay_mismatches.append(f"replay status {reply.status_code}")
                return
            choices = sorted(reply.json()["choices"], key=lambda c: c["index"])
            texts = [c["text"] if "text" in c else c["message"]["content"] for c in choices]
            report.replayed += 1
            if texts != item.texts:
                report.replay_mismatches.append(f"{item.path} {json.dumps(item.body)[:160]}: {item.texts!r} "
                                                f"then {texts!r}")
        await asyncio.gather(*(replay(r) for r in replays))
        report.server_5xx = await metric(client, "customllm_http_requests_total", ("status", "5")) \
            - server_5xx_before
    return report


def run_soak(base_url: str, cfg: SoakConfig) -> SoakReport:
    """Run the soak against `base_url` (loopback) and return its report; see the module doc for the checks."""
    return asyncio.run(run_soak_async(base_url, cfg))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server to soak (loopback only)")
    parser.add_argument("--pid", type=int, default=None, help="server process whose resident memory to watch")
    parser.add_argument("--start-server", action="store_true",
                        help="start `python -m server` on a free loopback port (tiny random model unless --model)")
    parser.add_argument("--model", default=None, help="with --start-server: checkpoint to serve")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default 600)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds before the memory baseline")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-prompt-tokens", type=int, default=200)
    parser.add_argument("--max-output-tokens", type=int, default=64)
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)

    def run(url: str, pid: int | None) -> SoakReport:
        cfg = SoakConfig(duration=args.duration, concurrency=args.concurrency, seed=args.seed, warmup=args.warmup,
                         max_prompt_tokens=args.max_prompt_tokens, max_output_tokens=args.max_output_tokens,
                         memory_pid=pid)
        print(f"soaking {url} for {args.duration:.0f} s at concurrency {args.concurrency}", flush=True)
        return run_soak(url, cfg)

    if args.start_server:
        from bench.local_server import local_server
        extra = ["--max-num-seqs", str(max(args.concurrency * 2, 64)), "--kv-cache-tokens", "65536"]
        with local_server(args.model, extra) as server:
            report = run(server.url, server.pid)
    else:
        report = run(args.url, args.pid)
    print(report.summary())
    if args.json:
        data = dataclasses.asdict(report) | {"memory_growth": report.memory_growth, "problems": report.problems()}
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2)
    return 0 if not report.problems() else 1


if __name__ == "__main__":
    sys.exit(main())
