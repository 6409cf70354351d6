"""Multi-Head Latent Attention over a paged latent cache.

Shapes: T new tokens, H heads, N no-position width (head_dim/2), R rope width (head_dim/2),
Dh head_dim = N + R, L latent, C context tokens, B decode sequences, S padded decode context.
Cache entry per token: [c_kv (L) | k_rope of every head (H*R)], k_rope stored after rotation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.layers import apply_rope
from model.metadata import AttentionMetadata


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, latent_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.nope_dim = self.rope_dim = self.head_dim // 2
        self.latent_dim = latent_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        h, n, r = num_heads, self.nope_dim, self.rope_dim
        self.kv_proj_d = nn.Linear(hidden_size, latent_dim, bias=False)
        self.q_proj_d = nn.Linear(hidden_size, latent_dim, bias=False)
        self.k_proj_u = nn.Linear(latent_dim, h * n, bias=False)
        self.v_proj_u = nn.Linear(latent_dim, h * self.head_dim, bias=False)
        self.q_proj_u = nn.Linear(latent_dim, h * n, bias=False)
        self.rope_k = nn.Linear(hidden_size, h * r, bias=False)
        self.rope_q = nn.Linear(latent_dim, h * r, bias=False)
        self.o_proj = nn.Linear(h * self.head_dim, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                cache: torch.Tensor) -> torch.Tensor:
        """x [T, D] normalised hidden states; cos/sin [T, R]; cache [num_blocks, block_size, L + H*R]."""
        t = x.shape[0]
        h, n, r = self.num_heads, self.nope_dim, self.rope_dim
        c_kv = self.kv_proj_d(x)  # [T, L]
        c_q = self.q_proj_d(x)  # [T, L]
        q_nope = self.q_proj_u(c_q).view(t, h, n)
        q_rope = apply_rope(self.rope_q(c_q).view(t, h, r), cos, sin)
        k_rope = apply_rope(self.rope_k(x).view(t, h, r), cos, sin)  # rope_k reads x, not the latent

        # Write the new tokens first: attention below reads every context token, new ones included,
        # from the cache (so a sequence can also read blocks another sequence writes in this same step).
        flat_cache = cache.view(-1, cache.shape[-1])  # [num_slots, L + H*R]
        flat_cache.index_copy_(0, meta.slot_mapping, torch.cat((c_kv, k_rope.reshape(t, h * r)), dim=-1))

        out = x.new_empty(t, h, self.head_dim)
        p = meta.num_prefill_tokens
        if p:
            out[:p] = self._prefill(q_nope[:p], q_rope[:p], meta, flat_cache)
        if p < t:
            out[p:] = self._decode(q_nope[p:], q_rope[p:], meta, cache)
        return self.o_proj(out.view(t, h * self.head_dim))

    def _prefill(self, q_nope: torch.Tensor, q_rope: torch.Tensor, meta: AttentionMetadata,
                 flat_cache: torch.Tensor) -> torch.Tensor:
        """Decompressed attention: rebuild k and v of each prefill sequence's context from its latents."""
        h, n, r, latent = self.num_heads, self.nope_dim, self.rope_dim, self.latent_dim
        ctx = flat_cache.index_select(0, meta.prefill_context_slots)  # [C, L + H*R]
        c_kv = ctx[:, :latent]
        k = torch.cat((self.k_proj_u(c_kv).view(-1, h, n), ctx[:, latent:].view(-1, h, r)), dim=-1)  # [C, H, Dh]
        v = self.v_proj_u(c_kv).view(-1, h, self.head_dim)  # [C, H, Dh]
        q = torch.cat((q_nope, q_rope), dim=-1)  # [Tp, H, Dh]

        outs = []
        q_start = ctx_start = 0
        for q_len, ctx_len in zip(meta.prefill_query_lens, meta.prefill_context_lens, strict=True):
            qi = q[q_start:q_start + q_len].transpose(0, 1)  # [H, Q, Dh]
            ki = k[ctx_start:ctx_start + ctx_len].transpose(0, 1)  # [H, C, Dh]
            vi = v[ctx_start:ctx_start + ctx_len].transpose(0, 1)
            if q_len == ctx_len:
                oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True)
            else:
                # Query j sits at position ctx_len - q_len + j and sees keys up to that position.
                q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
                mask = torch.arange(ctx_len, device=q.device)[None, :] <= q_pos[:, None]  # [Q, C]
                oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask)
            outs.append(oi.transpose(0, 1))  # [Q, H, Dh]
            q_start += q_len
            ctx_start += ctx_len
        return torch.cat(outs)

    def _decode(self, q_nope: torch.Tensor, q_rope: torch.Tensor, meta: AttentionMetadata,
                cache: torch.Tensor) -> torch.Tensor:
        """Absorbed attention: score and mix the cached latents directly, never building k or v.

        With W_k = k_proj_u rows of head h [N, L] and W_v = v_proj_u rows [Dh, L]:
          q_nope . (W_k c) = (W_k^T q_nope) . c      -> fold W_k into the query once per token
          sum_s p_s (W_v c_s) = W_v (sum_s p_s c_s)  -> mix latents, then expand once per token
        """
        h, r, latent = self.num_heads, self.rope_dim, self.latent_dim
        b = q_nope.shape[0]
        w_k = self.k_proj_u.weight.view(h, self.nope_dim, latent)
        w_v = self.v_proj_u.weight.view(h, self.head_dim, latent)
        ctx = cache[meta.decode_block_tables].view(b, -1, cache.shape[-1])  # [B, S, L + H*R]
        c_kv = ctx[..., :latent]  # [B, S, L]
        k_rope = ctx[..., latent:].view(b, -1, h, r)  # [B, S, H, R]

        q_latent = torch.einsum("bhn,hnl->bhl", q_nope, w_k)
        scores = torch.einsum("bhl,bsl->bhs", q_latent, c_kv) + torch.einsum("bhr,bshr->bhs", q_rope, k_rope)
        scores = scores.float() * self.scale
        scores.masked_fill_(~meta.decode_valid[:, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).to(c_kv.dtype)  # [B, H, S]
        mixed = torch.einsum("bhs,bsl->bhl", probs, c_kv)  # [B, H, L]
        return torch.einsum("bhl,hdl->bhd", mixed, w_v)  # [B, H, Dh]
