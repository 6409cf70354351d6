"""The GPU check's measurements (run by tools/gpu_check.sh; each part writes one JSON file into --out).

  equivalence  CPU float32 reference against device bfloat16, teacher-forced logits (prefill chunk + decode steps)
  graphs       decode through CUDA graph replay against the same static path run eagerly, and against unpadded eager
  engine       decode-step timings at several batch sizes, graphs on and off; the 256-sequence nano-vllm shape

Usage: python tools/gpu/check.py PART --out DIR [--device cuda|cpu] [--tiny]
--tiny (with --device cpu: the dry run) swaps the seed model for a small one so every part runs in seconds.
Random weights from a seed, drawn on the host (the same values on every device and dtype): nothing to download.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from model import AttentionMetadata, CustomLLM, ModelConfig, PagedLatentCache, load_model
from server.engine.cuda_graphs import DecodeGraphRunner
from server.engine.sampling_params import SamplingParams
from server.startup import build_engine

TINY = ModelConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, latent_dim=16,
                   intermediate_size=64, num_experts=5, num_shared_experts=1, top_k_experts=2,
                   max_position_embeddings=2048)
BS = 16


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def teacher_forced(model: CustomLLM, seqs: list[list[int]], prefill: int, device: torch.device) -> torch.Tensor:
    """Logits [num_seqs, len - prefill + 1, V] (float32, on the CPU): each sequence's first `prefill` tokens as one
    chunk, then its remaining tokens one decode step at a time, all sequences batched."""
    length = len(seqs[0])
    per_seq = -(-length // BS)
    cache = PagedLatentCache(model.config, len(seqs) * per_seq + 1, BS, next(model.parameters()).dtype, device)
    tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(len(seqs))]
    out = []
    ids = [t for s in seqs for t in s[:prefill]]
    meta = AttentionMetadata.build([prefill] * len(seqs), [prefill] * len(seqs), tables, BS, device)
    hidden = model(torch.tensor(ids, device=device), torch.arange(prefill, device=device).repeat(len(seqs)), meta,
                   cache.layers)
    out.append(model.compute_logits(hidden[prefill - 1::prefill]).cpu())
    for pos in range(prefill, length):
        meta = AttentionMetadata.build([1] * len(seqs), [pos + 1] * len(seqs), tables, BS, device)
        hidden = model(torch.tensor([s[pos] for s in seqs], device=device),
                       torch.full((len(seqs),), pos, device=device), meta, cache.layers)
        out.append(model.compute_logits(hidden).cpu())
    return torch.stack(out, dim=1)


def equivalence(args: argparse.Namespace, config: ModelConfig) -> dict[str, Any]:
    device = torch.device(args.device)
    rng = random.Random(0)
    seqs = [[rng.randrange(1, config.vocab_size) for _ in range(64)] for _ in range(4)]
    ref = teacher_forced(load_model(None, torch.float32, "cpu", seed=0, config=config), seqs, 16,
                         torch.device("cpu"))
    got = teacher_forced(load_model(None, torch.bfloat16, device, seed=0, config=config), seqs, 16, device)
    ref, got = ref.flatten(0, 1), got.flatten(0, 1)  # [rows, V]
    rel_rows = (got - ref).norm(dim=-1) / ref.norm(dim=-1)  # [rows]
    rel = rel_rows.max().item()
    top2 = ref.topk(2, dim=-1).values
    # "clear" top-2 margin: more than 1% of the row's logit range
    clear = (top2[:, 0] - top2[:, 1]) > 0.01 * (ref.max(dim=-1).values - ref.min(dim=-1).values)
    agree = (got.argmax(-1) == ref.argmax(-1))[clear]
    result = {"rows": ref.shape[0], "max_relative_error": rel, "median_relative_error": rel_rows.median().item(),
              "p90_relative_error": rel_rows.quantile(0.9).item(),
              "rows_within_1e-2": float((rel_rows <= 1e-2).float().mean()), "clear_rows": int(clear.sum()),
              "greedy_agreement_clear": float(agree.float().mean()) if agree.numel() else None,
              "greedy_agreement_all": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}
    # NOTE: with random weights the router's scores are near-tied (sigmoid ~ 0.5 for every expert), so bf16
    # rounding flips a top-2 choice on a few tokens, a discrete jump of that row's logits (tiny model on CPU:
    # median 0.5%, p90 0.55%, max 5.2%). So the pass mark is per row: 95% of rows within 1e-2; the max is reported.
    result["pass"] = result["rows_within_1e-2"] >= 0.95 and result["greedy_agreement_clear"] in (None, 1.0)
    return result


def decode_case(config: ModelConfig, dtype: torch.dtype, device: torch.device, max_seqs: int, context: int,
                seed: int) -> tuple[list[torch.Tensor], int, int]:
    """A random cache for max_seqs sequences of `context` tokens (+1), a scratch block at the end."""
    per_seq = -(-(context + 1) // BS)
    num_blocks = max_seqs * per_seq
    cache = PagedLatentCache(config, num_blocks + 1, BS, dtype, device)
    g = torch.Generator(device=device).manual_seed(seed)
    for layer in cache.layers:
        layer.normal_(generator=g)
    return cache.layers, per_seq, num_blocks


def graphs(args: argparse.Namespace, config: ModelConfig) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = torch.bfloat16
    model = load_model(None, dtype, device, seed=0, config=config)
    max_seqs, context = 256, 300
    base, per_seq, scratch = decode_case(config, dtype, device, max_seqs, context, 1)
    caches = {mode: [c.clone() for c in base] for mode in ("replay", "static", "plain")}
    runners = {mode: DecodeGraphRunner(model, caches[mode], max_num_seqs=max_seqs, max_blocks_per_seq=per_seq,
                                       block_size=BS, scratch_block=scratch,
                                       use_cuda_graphs=mode == "replay" and device.type == "cuda")
               for mode in ("replay", "static")}
    rng = random.Random(2)
    steps = []
    for b in (1, 3, 8, 33, 64, 100, 255, 256, 5):
        lens = [rng.randint(1, context + 1) for _ in range(b)]
        tables = [list(range(i * per_seq, (i + 1) * per_seq))[:-(-n // BS)] for i, n in enumerate(lens)]
        ids = [rng.randrange(1, config.vocab_size) for _ in range(b)]
        pos = [n - 1 for n in lens]
        logits = {}
        for mode, runner in runners.items():
            hidden, _ = runner.run(ids, pos, lens, tables)
            logits[mode] = model.compute_logits(hidden).cpu()
        meta = AttentionMetadata.build([1] * b, lens, tables, BS, device)
        hidden = model(torch.tensor(ids, device=device), torch.tensor(pos, device=device), meta, caches["plain"])
        logits["plain"] = model.compute_logits(hidden).cpu()
        steps.append({
            "batch": b, "bucket": runners["replay"].bucket_for(b),
            "replay_equals_static_eager": bool(torch.equal(logits["replay"], logits["static"])),
            "max_abs_diff_vs_unpadded": (logits["replay"] - logits["plain"]).abs().max().item(),
            "greedy_agreement_vs_unpadded": float((logits["replay"].argmax(-1) == logits["plain"].argmax(-1))
                                                  .float().mean())})
    return {"steps": steps, "cuda_graphs": device.type == "cuda",
            "pass": all(s["replay_equals_static_eager"] for s in steps)}


def step_time(fn: Any, device: torch.device, repeats: int) -> float:
    """Median seconds per call after two warm-up calls (a GPU step is short and steady; the median ignores spikes)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def decode_steps(model: CustomLLM, layers: list[torch.Tensor], runner: DecodeGraphRunner, b: int, context: int,
                 per_seq: int) -> dict[str, Any]:
    """One decode step of b sequences at `context` cached tokens, as replay and as the eager path."""
    device = layers[0].device
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(b)]
    ids, pos, lens = [7] * b, [context] * b, [context + 1] * b

    def graph_step() -> list[int]:
        hidden, _ = runner.run(ids, pos, lens, tables)
        return model.compute_logits(hidden).argmax(-1).tolist()  # logits and a greedy pick, as a step does

    def eager_step() -> list[int]:
        meta = AttentionMetadata.build([1] * b, lens, tables, BS, device)
        hidden = model(torch.tensor(ids, device=device), torch.tensor(pos, device=device), meta, layers)
        return model.compute_logits(hidden).argmax(-1).tolist()

    return {"graphs": graph_step, "eager": eager_step}


def engine(args: argparse.Namespace, config: ModelConfig) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = torch.bfloat16
    model = load_model(None, dtype, device, seed=0, config=config)
    context = 256
    batches = [1, 8, 32, 64, 128, 256] if not args.tiny else [1, 8, 32]
    layers, per_seq, scratch = decode_case(config, dtype, device, max(batches), context, 3)
    runner = DecodeGraphRunner(model, layers, max_num_seqs=max(batches), max_blocks_per_seq=per_seq, block_size=BS,
                               scratch_block=scratch, use_cuda_graphs=device.type == "cuda")
    decode = []
    for b in batches:
        row: dict[str, Any] = {"batch": b, "context": context}
        for name, fn in decode_steps(model, layers, runner, b, context, per_seq).items():
            seconds = step_time(fn, device, 5 if args.tiny else 20)
            row[f"{name}_ms"] = seconds * 1e3
            row[f"{name}_tok_s"] = b / seconds
        decode.append(row)
        print(f"decode b={b}: graphs {row['graphs_ms']:.2f} ms, eager {row['eager_ms']:.2f} ms", flush=True)
    del runner, layers, model  # the graphs' pool and the cache, before the engines allocate theirs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"decode": decode, "nano_vllm": [nano_vllm_shape(args, config, eager) for eager in (False, True)]}


def nano_vllm_shape(args: argparse.Namespace, config: ModelConfig, enforce_eager: bool) -> dict[str, Any]:
    """nano-vllm's benchmark: 256 sequences, input and output lengths uniform in 100..1024, through the engine."""
    num_seqs, lo, hi = (256, 100, 1024) if not args.tiny else (16, 10, 40)
    rng = random.Random(0)
    reqs = [([rng.randrange(1, config.vocab_size) for _ in range(rng.randint(lo, hi))], rng.randint(lo, hi))
            for _ in range(num_seqs)]
    eng = build_engine(None, dtype="bfloat16", device=args.device, model_config=config, max_num_seqs=num_seqs,
                       max_num_batched_tokens=4096, kv_cache_tokens=str(num_seqs * 2 * hi + 4096),
                       enforce_eager=enforce_eager)
    eng.start()

    async def one(i: int, prompt: list[int], max_tokens: int) -> int:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        return sum([len(o.token_ids) for batch in [b async for b in eng.add_request(f"r{i}", prompt, params)]
                    for o in batch])

    async def main() -> list[int]:
        return await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(reqs)))

    try:
        start = time.perf_counter()
        produced = asyncio.run(main())
        seconds = time.perf_counter() - start
    finally:
        eng.shutdown()
    total = sum(produced)
    assert total == sum(n for _, n in reqs), f"{total} tokens produced, {sum(n for _, n in reqs)} asked for"
    result = {"enforce_eager": enforce_eager, "num_seqs": num_seqs, "output_tokens": total, "seconds": seconds,
              "output_tok_s": total / seconds, "cuda_graphs": eng.runner.decode_runner is not None}
    mode = "eager" if enforce_eager else "graphs"
    print(f"nano-vllm shape ({mode}): {total / seconds:,.0f} output tok/s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["equivalence", "graphs", "engine"])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="a small model instead of the seed model")
    args = parser.parse_args()
    config = TINY if args.tiny else ModelConfig()
    part = {"equivalence": equivalence, "graphs": graphs, "engine": engine}[args.part]
    start = time.perf_counter()
    result = part(args, config)
    result.update(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", torch=torch.__version__,
                  tiny=args.tiny, seconds_total=time.perf_counter() - start)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.part}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result)[:2000])


if __name__ == "__main__":
    main()
