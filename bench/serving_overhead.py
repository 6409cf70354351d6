"""The time a token spends outside the model at 1 stream: a real server streaming one request at a time, its
engine's steps timed from inside, against what the client sees.

Usage: python bench/serving_overhead.py [--dtype bfloat16] [--requests 3] [--prompt-len 64] [--output-len 128]
                                       [--decode-layer auto|modules]

Starts `python -m server` (seed model, random weights) in a child process whose engine thread times, per step:
the whole `Engine.step` (schedule, run, update, emit), `ModelRunner.execute` (metadata, forward, logits,
sampling), the model's forward, `compute_logits` and the sampler; and the gap between one step's end and the
next one's start (inbox, metrics, waiting). The client (bench/serve.py's request, a real SSE stream) records each
token's arrival. Then the same decode step runs in this process without a server (bench/model_step.py's step), so
the model's time inside the server (GIL and cores shared with the HTTP side) can be compared with its time alone.
Medians over the decode steps of every request but the first (warm-up). `--decode-layer modules` makes the
server run every layer from Python (the decode layer backend has no server flag: set in the child only).
Prints a table; not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import functools
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

# Run as `python bench/serving_overhead.py`, sys.path starts at bench/: put the repository root first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.local_server import ROOT, free_port, wait_healthy
from bench.serve import one_request, random_prompts

# What the child times: (module, class, method) -> label.
_TIMED = {
    ("server.engine.engine", "Engine", "step"): "engine step",
    ("server.engine.model_runner", "ModelRunner", "execute"): "runner.execute",
    ("model.model", "CustomLLM", "forward"): "model forward",
    ("model.model", "CustomLLM", "compute_logits"): "compute_logits",
    ("server.engine.sampler", "Sampler", "sample"): "sampler",
}


def _instrument(out_path: str) -> None:
    """In the server process: time the engine thread's calls of _TIMED; write them to out_path at exit."""
    import importlib

    calls: dict[str, list[tuple[float, float]]] = defaultdict(list)  # label -> (start, seconds)

    def timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if threading.current_thread().name == "engine":
                    calls[label].append((start, time.perf_counter() - start))
        return wrapper

    for (module, cls, method), label in _TIMED.items():
        owner = getattr(importlib.import_module(module), cls)
        setattr(owner, method, timed(label, getattr(owner, method)))
    atexit.register(lambda: Path(out_path).write_text(json.dumps(calls)))


def _serve_child(out_path: str, server_args: list[str], decode_layer: str = "auto") -> int:
    _instrument(out_path)
    import server.startup
    from server.cli import main

    server.startup.select_backends = functools.partial(server.startup.select_backends,  # type: ignore[assignment]
                                                       decode_layer=decode_layer)

    return main(server_args)


def _median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3 if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--requests", type=int, default=3, help="sequential requests; the first is a warm-up")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--standalone-steps", type=int, default=30)
    parser.add_argument("--decode-layer", default="auto", help="the server's decode layer backend")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="customllm-overhead-") as tmp:
        out_path = str(Path(tmp) / "calls.json")
        server_args = ["--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype, "--device", "cpu",
                       "--log-level", "warning"]
        env = os.environ | {"PYTHONPATH": str(ROOT)}
        child = [sys.executable, "-c", f"import sys; from bench.serving_overhead import _serve_child; "
                 f"sys.exit(_serve_child({out_path!r}, {server_args!r}, {args.decode_layer!r}))"]
        proc = subprocess.Popen(child, env=env, cwd=ROOT)
        try:
            wait_healthy(proc, url, timeout=300, interval=0.5)
            prompts = random_prompts(args.requests, args.prompt_len, 49152, seed=0)
            results = []
            windows = []  # (start, end) of each measured request, perf_counter of this host (same clock)

            async def run() -> None:
                async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0)) as client:
                    for i, prompt in enumerate(prompts):
                        start = time.perf_counter()
                        result = await one_request(client, None, prompt, args.output_len, True)
                        assert result.ok, result.error
                        if i > 0:
                            results.append(result)
                            windows.append((start, time.perf_counter()))

            asyncio.run(run())
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        calls = json.loads(Path(out_path).read_text())

    # The engine's decode steps inside the measured requests: every step but each request's first (its prefill).
    def in_windows(label: str) -> list[tuple[float, float]]:
        return [(s, d) for s, d in calls.get(label, []) if any(a <= s <= b for a, b in windows)]

    steps = in_windows("engine step")
    decode_starts = set()
    for a, b in windows:
        inside = sorted(s for s, _ in steps if a <= s <= b)
        decode_starts.update(inside[1:])
    decode_steps = [(s, d) for s, d in steps if s in decode_starts]
    gaps = [s2 - (s1 + d1) for (s1, d1), (s2, _) in itertools.pairwise(decode_steps) if s2 - s1 < 1.0]

    def decode_only(label: str) -> list[float]:
        spans = sorted(decode_steps)
        out = []
        for s, d in in_windows(label):
            if any(a <= s <= a + b for a, b in spans):
                out.append(d)
        return out

    itls = [x for r in results for x in r.itls]
    rows = [("client inter-token latency", _median_ms(itls)),
            ("engine step (whole)", _median_ms([d for _, d in decode_steps])),
            ("  gap between engine steps", _median_ms(gaps)),
            ("  runner.execute", _median_ms(decode_only("runner.execute"))),
            ("    model forward", _median_ms(decode_only("model forward"))),
            ("    compute_logits", _median_ms(decode_only("compute_logits"))),
            ("    sampler", _median_ms(decode_only("sampler")))]

    import torch

    from bench.model_step import decode_step, load_seed_model, make_cache
    from model import ModelConfig

    dtype = getattr(torch, args.dtype)
    model = load_seed_model(dtype, decode_layer=args.decode_layer)
    context = args.prompt_len + args.output_len // 2
    cache = make_cache(ModelConfig(), dtype, 1, context, prompt=0)
    step = decode_step(model, cache, 1, context)
    step()
    alone = []
    for _ in range(args.standalone_steps):
        start = time.perf_counter()
        step()
        alone.append(time.perf_counter() - start)
    rows.append((f"same step alone (metadata, forward, logits; context {context})", _median_ms(alone)))
    print(f"\n{args.dtype}, decode layer {args.decode_layer}, 1 stream, {len(results)} requests x "
          f"{args.output_len} tokens after a warm-up, "
          f"{len(decode_steps)} decode steps; medians, ms")
    for name, ms in rows:
        print(f"  {name:<60} {ms:7.2f}")


if __name__ == "__main__":
    main()
