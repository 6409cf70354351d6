"""A straightforward CustomLLM written from MODEL_SPEC.md alone: one sequence, full recompute, no cache,
a per-token loop over experts. The served path is checked against it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model import ModelConfig


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """x [S, H, R] rotated at positions pos [S], half-split convention."""
    r = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, r, 2, dtype=torch.float32) / r)
    angle = pos.float()[:, None] * inv_freq
    emb = torch.cat((angle, angle), -1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    rot = torch.cat((-x[..., r // 2:], x[..., : r // 2]), -1)
    return x * cos + rot * sin


def _expert(sd: dict[str, torch.Tensor], prefix: str, h: torch.Tensor) -> torch.Tensor:
    gate = h @ sd[f"{prefix}.gate_proj.weight"].T
    up = h @ sd[f"{prefix}.up_proj.weight"].T
    return (F.silu(gate) * up) @ sd[f"{prefix}.down_proj.weight"].T


def reference_logits(sd: dict[str, torch.Tensor], cfg: ModelConfig, ids: list[int]) -> torch.Tensor:
    """Logits [S, V] of every position of one sequence."""
    return reference_forward(sd, cfg, ids)[0]


def reference_routing(sd: dict[str, torch.Tensor], cfg: ModelConfig, ids: list[int]) -> torch.Tensor:
    """The routed experts [S, layers, K] every position of one sequence chose, in top-k order."""
    return reference_forward(sd, cfg, ids)[1]


def reference_forward(sd: dict[str, torch.Tensor], cfg: ModelConfig,
                      ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [S, V] and routed experts [S, layers, K] of every position of one sequence."""
    s, nh = len(ids), cfg.num_attention_heads
    half = cfg.head_dim // 2
    pos = torch.arange(s)
    x = sd["token_embeddings.weight"][torch.tensor(ids)] + sd["position_embeddings.weight"][pos]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    routing = []
    for n in range(cfg.num_hidden_layers):
        p = f"decoder_layers.{n}"
        a = f"{p}.self_attn"
        h = _rms(x, sd[f"{p}.input_norm.weight"], cfg.rms_norm_eps)
        c_kv = h @ sd[f"{a}.kv_proj_d.weight"].T
        c_q = h @ sd[f"{a}.q_proj_d.weight"].T
        k_nope = (c_kv @ sd[f"{a}.k_proj_u.weight"].T).view(s, nh, half)
        v = (c_kv @ sd[f"{a}.v_proj_u.weight"].T).view(s, nh, cfg.head_dim)
        q_nope = (c_q @ sd[f"{a}.q_proj_u.weight"].T).view(s, nh, half)
        k_rope = _rope((h @ sd[f"{a}.rope_k.weight"].T).view(s, nh, half), pos, cfg.rope_theta)
        q_rope = _rope((c_q @ sd[f"{a}.rope_q.weight"].T).view(s, nh, half), pos, cfg.rope_theta)
        q = torch.cat((q_nope, q_rope), -1).transpose(0, 1)  # [H, S, 64]
        k = torch.cat((k_nope, k_rope), -1).transpose(0, 1)
        scores = (q @ k.transpose(1, 2)) / math.sqrt(cfg.head_dim)
        scores = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        attn = (scores @ v.transpose(0, 1)).transpose(0, 1).reshape(s, nh * cfg.head_dim)
        x = x + attn @ sd[f"{a}.o_proj.weight"].T

        m = f"{p}.mlp.moe"
        h = _rms(x, sd[f"{p}.post_attn_norm.weight"], cfg.rms_norm_eps)
        out = torch.zeros_like(h)
        for e in range(cfg.num_shared_experts):
            out += _expert(sd, f"{m}.shared_experts.{e}", h)
        if cfg.num_shared_experts > 1:
            out /= cfg.num_shared_experts
        probs = torch.sigmoid(h @ sd[f"{m}.router.weight"].T + sd[f"{m}.routing_bias"])
        w, idx = probs.topk(cfg.top_k_experts, dim=-1)
        routing.append(idx)
        w = w / w.sum(-1, keepdim=True)
        for t in range(s):  # per-token loop over its chosen experts
            for j in range(cfg.top_k_experts):
                out[t] += w[t, j] * _expert(sd, f"{m}.routed_experts.{int(idx[t, j])}", h[t : t + 1])[0]
        x = x + out
    return x @ sd["lm_head.weight"].T + sd["lm_head.bias"], torch.stack(routing, dim=1)


def reference_greedy(sd: dict[str, torch.Tensor], cfg: ModelConfig, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(reference_logits(sd, cfg, ids)[-1].argmax()))
    return ids[len(prompt):]
