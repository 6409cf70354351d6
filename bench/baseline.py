"""What a user without this server would run: one request at a time, an HF-style generate() loop.

Same model and dtype as the server, but a growing decompressed k/v cache (k and v of every past token, concatenated
each step) and the original MoE: a loop over experts, each run on the tokens whose mask selects it. Prints tok/s.

  python bench/baseline.py [--model PATH] [--dtype bfloat16] [--requests 4] [--prompt-len 64] [--output-len 64]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# Run as `python bench/baseline.py`, sys.path starts at bench/: put the repository root first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import CustomLLM, load_checkpoint
from model.layers import RMSNorm, apply_rope_, rope_cos_sin
from model.moe import Expert, MoE


def moe_masked(moe: MoE, h: torch.Tensor) -> torch.Tensor:
    """The training code's MoE: shared experts on all tokens, then each routed expert on its masked tokens."""
    def expert(e: Expert, x: torch.Tensor) -> torch.Tensor:
        return e.down_proj(F.silu(e.gate_proj(x)) * e.up_proj(x))

    out = sum(expert(e, h) for e in moe.shared_experts) / len(moe.shared_experts)
    probs = torch.sigmoid((moe.router(h) + moe.routing_bias).float())  # [T, E]
    weights, idx = probs.topk(moe.top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    for e in range(moe.num_routed_experts):
        mask = idx == e  # [T, K]
        rows = mask.any(-1)
        if rows.any():
            w = (weights * mask).sum(-1, keepdim=True)[rows].to(h.dtype)
            out[rows] += w * expert(moe.routed_experts[e], h[rows])
    return out


def norm(layer: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return layer.weight * F.rms_norm(x, (x.shape[-1],), eps=layer.eps)


@torch.inference_mode()
def generate(model: CustomLLM, prompt: list[int], max_new: int) -> list[int]:
    """Greedy decoding with a per-layer [past, H, Dh] k/v cache that grows by concatenation, on the checkpoint's
    tensors as loaded (`load_checkpoint`: nothing processed)."""
    cfg = model.config
    h, n, r = cfg.num_attention_heads, cfg.nope_dim, cfg.rope_dim
    past: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * cfg.num_hidden_layers
    ids = torch.tensor(prompt)
    start = 0
    out: list[int] = []
    for _ in range(max_new):
        pos = torch.arange(start, start + len(ids))
        x = model.token_embeddings(ids) + model.position_embeddings(pos)
        cos, sin = rope_cos_sin(pos, r, cfg.rope_theta)
        for i, layer in enumerate(model.decoder_layers):
            a = layer.self_attn
            hn = norm(layer.input_norm, x)
            c_kv, c_q = a.kv_proj_d(hn), a.q_proj_d(hn)
            k_rope, q_rope = a.rope_k(hn).view(-1, h, r), a.rope_q(c_q).view(-1, h, r)
            apply_rope_(k_rope, cos, sin)
            apply_rope_(q_rope, cos, sin)
            k = torch.cat((a.k_proj_u(c_kv).view(-1, h, n), k_rope), -1)
            v = a.v_proj_u(c_kv).view(-1, h, cfg.head_dim)
            q = torch.cat((a.q_proj_u(c_q).view(-1, h, n), q_rope), -1)
            cached = past[i]
            if cached is not None:
                k, v = torch.cat((cached[0], k)), torch.cat((cached[1], v))
            past[i] = (k, v)
            scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(cfg.head_dim)
            mask = torch.arange(k.shape[0])[None, :] <= pos[:, None]
            probs = scores.float().masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype)
            x = x + F.linear(torch.einsum("hqk,khd->qhd", probs, v).reshape(len(ids), -1), a.o_proj.weight)
            x = x + moe_masked(layer.mlp.moe, norm(layer.post_attn_norm, x))
        token = int(F.linear(x[-1:], model.lm_head.weight, model.lm_head.bias).argmax())
        out.append(token)
        start += len(ids)
        ids = torch.tensor([token])
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint (default: the seed model, random weights)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    model = load_checkpoint(args.model, dtype=getattr(torch, args.dtype))  # plain dense weights and F.linear
    rng = random.Random(0)
    prompts = [[rng.randrange(100, model.config.vocab_size) for _ in range(args.prompt_len)]
               for _ in range(args.requests)]
    generate(model, prompts[0][:8], 2)  # warm-up
    start = time.perf_counter()
    tokens = sum(len(generate(model, p, args.output_len)) for p in prompts)
    elapsed = time.perf_counter() - start
    result = {"requests": args.requests, "output_tokens": tokens, "seconds": elapsed,
              "output_tok_per_s": tokens / elapsed}
    print(f"baseline (one request at a time, growing k/v cache, masked MoE loop, {args.dtype}): "
          f"{tokens} tokens in {elapsed:.1f} s = {tokens / elapsed:.1f} tok/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
