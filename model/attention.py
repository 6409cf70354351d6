"""Multi-Head Latent Attention over a paged latent cache.

Shapes: T new tokens, H heads, N no-position width (head_dim/2), R rope width (head_dim/2),
Dh head_dim = N + R, L latent, C context tokens, B decode sequences, S decode context (padded to whole blocks),
F cache entry width L + H*R.
Cache entry per token: [c_kv (L) | k_rope of every head (H*R)], k_rope stored after rotation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.backends import ModelBackends
from model.layers import NOT_PROCESSED, Linear, apply_rope_
from model.metadata import AttentionMetadata
from model.ops.linear import LinearBackend
from model.ops.mla_decode import MLADecodeBackend

# The checkpoint's projections, fused by process_weights into AttentionWeights and then dropped.
_PROJECTIONS = ("kv_proj_d", "q_proj_d", "k_proj_u", "v_proj_u", "q_proj_u", "rope_k", "rope_q")


@dataclasses.dataclass(frozen=True)
class AttentionWeights:
    """What forward runs on, built once from the checkpoint's projections by `process_weights`."""

    linear: LinearBackend  # w_in, w_q and w_kv_up are in its form (packed, int8, ...) of the shapes below
    w_in: Any  # [L + H*R + L, D]: kv_proj_d | rope_k | q_proj_d
    w_q: Any  # [H*Dh, L]: per head q_proj_u rows | rope_q rows
    w_kv_up: Any  # [H*N + H*Dh, L]: k_proj_u | v_proj_u (prefill decompression)
    w_k: torch.Tensor  # [H, N, L]: k_proj_u per head (decode folds it into the query), in the decode dtype
    w_v_t: torch.Tensor  # [H, L, Dh]: v_proj_u per head, transposed (decode's absorbed value expansion)
    decode: MLADecodeBackend  # the latent mix of decode attention (model/ops/mla_decode.py)


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
        self.o_proj = Linear(h * self.head_dim, hidden_size, bias=False)
        self.weights: AttentionWeights | None = None

    @torch.no_grad()
    def process_weights(self, backends: ModelBackends) -> None:
        """Fuse the projections into the linear backend's form (and W_k, W_v per head for the absorbed decode),
        then drop the checkpoint's separate ones."""
        h, n, r, latent, d = self.num_heads, self.nope_dim, self.rope_dim, self.latent_dim, self.head_dim
        linear, decode = backends.linear, backends.mla_decode
        # Everything that reads the normalised hidden state, in one GEMM whose first L + H*R outputs are
        # the cache entry [c_kv | k_rope] (rotated in place), followed by c_q: [L + H*R + L, D].
        w_in = torch.cat((self.kv_proj_d.weight, self.rope_k.weight, self.q_proj_d.weight))
        # Everything that reads c_q, rows grouped per head as [q_nope_h | q_rope_h], so the output viewed
        # [T, H, Dh] is the query with its rope half still to rotate: [H*Dh, L].
        w_q = torch.cat((self.q_proj_u.weight.view(h, n, latent), self.rope_q.weight.view(h, r, latent)), dim=1)
        # Prefill decompression of the context latents: [k_nope (H*N) | v (H*Dh)] in one GEMM.
        w_kv_up = torch.cat((self.k_proj_u.weight, self.v_proj_u.weight))
        # The absorbed decode's small per-head GEMMs run in the decode backend's dtype (float32 for the
        # kernel: torch's bfloat16 bmm is a slow path on CPUs without native bfloat16).
        compute = decode.compute_dtype(w_in.dtype)
        w_k = self.k_proj_u.weight.view(h, n, latent).to(compute)
        w_v_t = self.v_proj_u.weight.view(h, d, latent).transpose(1, 2).to(compute).contiguous()
        self.weights = AttentionWeights(linear, w_in=linear.process(w_in),
                                        w_q=linear.process(w_q.reshape(h * d, latent)),
                                        w_kv_up=linear.process(w_kv_up), w_k=w_k, w_v_t=w_v_t, decode=decode)
        self.o_proj.process_weights(backends)
        for name in _PROJECTIONS:
            delattr(self, name)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                cache: torch.Tensor) -> torch.Tensor:
        """x [T, D] normalised hidden states; cos/sin [T, 1, R]; cache [num_blocks, block_size, F]."""
        prep = self.weights
        assert prep is not None, NOT_PROCESSED
        t = x.shape[0]
        h, r, latent, d = self.num_heads, self.rope_dim, self.latent_dim, self.head_dim
        linear = prep.linear.apply
        fused = linear(x, prep.w_in)  # [T, F + L]
        entry = fused[:, :latent + h * r]  # [T, F]: c_kv | k_rope, as cached
        apply_rope_(entry[:, latent:].view(t, h, r), cos, sin)
        q = linear(fused[:, latent + h * r:], prep.w_q).view(t, h, d)  # [T, H, Dh] = q_nope | q_rope
        apply_rope_(q[..., self.nope_dim:], cos, sin)

        # Write the new tokens first: attention below reads every context token, new ones included,
        # from the cache (so a sequence can also read blocks another sequence writes in this same step).
        flat_cache = cache.view(-1, cache.shape[-1])  # [num_slots, F]
        flat_cache.index_copy_(0, meta.slot_mapping, entry)

        p = meta.num_prefill_tokens
        if p == t:
            out = self._prefill(prep, q, meta, flat_cache)
        elif p == 0:
            out = self._decode(prep, q, meta, cache)
        else:
            out = torch.cat((self._prefill(prep, q[:p], meta, flat_cache), self._decode(prep, q[p:], meta, cache)))
        return self.o_proj(out.reshape(t, h * d))

    def _prefill(self, prep: AttentionWeights, q: torch.Tensor, meta: AttentionMetadata,
                 flat_cache: torch.Tensor) -> torch.Tensor:
        """Decompressed attention: rebuild k and v of each prefill sequence's context from its latents.

        q [Tp, H, Dh] (rope half rotated) -> [Tp, H, Dh].
        """
        h, n, latent = self.num_heads, self.nope_dim, self.latent_dim
        ctx = flat_cache.index_select(0, meta.prefill_context_slots)  # [C, F]
        kv = prep.linear.apply(ctx[:, :latent], prep.w_kv_up)  # [C, H*N + H*Dh]
        k = torch.cat((kv[:, :h * n].view(-1, h, n), ctx[:, latent:].view(-1, h, self.rope_dim)), dim=-1)  # [C, H, Dh]
        v = kv[:, h * n:].view(-1, h, self.head_dim)  # [C, H, Dh]

        outs = []
        q_start = ctx_start = 0
        for q_len, ctx_len in zip(meta.prefill_query_lens, meta.prefill_context_lens, strict=True):
            # 4-D [1, H, len, Dh]: with a batch dimension torch's CPU SDPA takes its flash kernel (3-D inputs
            # fall back to the unfused math path).
            qi = q[q_start:q_start + q_len].transpose(0, 1)[None]  # [1, H, Q, Dh]
            ki = k[ctx_start:ctx_start + ctx_len].transpose(0, 1)[None]  # [1, H, C, Dh]
            vi = v[ctx_start:ctx_start + ctx_len].transpose(0, 1)[None]
            if q_len == ctx_len:
                oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True)
            else:
                # Query j sits at position ctx_len - q_len + j and sees keys up to that position.
                q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
                mask = torch.arange(ctx_len, device=q.device)[None, :] <= q_pos[:, None]  # [Q, C]
                oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask)
            outs.append(oi[0].transpose(0, 1))  # [Q, H, Dh]
            q_start += q_len
            ctx_start += ctx_len
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _decode(self, prep: AttentionWeights, q: torch.Tensor, meta: AttentionMetadata,
                cache: torch.Tensor) -> torch.Tensor:
        """Absorbed attention: score and mix the cached latents directly, never building k or v.

        q [B, H, Dh] (rope half rotated) -> [B, H, Dh]. With W_k = k_proj_u rows of head h [N, L] and
        W_v = v_proj_u rows [Dh, L]:
          q_nope . (W_k c) = (W_k^T q_nope) . c      -> fold W_k into the query once per token
          sum_s p_s (W_v c_s) = W_v (sum_s p_s c_s)  -> mix latents (the decode backend), then expand once
        """
        n, compute = self.nope_dim, prep.w_k.dtype
        q_lat = torch.bmm(q[..., :n].to(compute).transpose(0, 1), prep.w_k).transpose(0, 1)  # [B, H, L]
        mixed = prep.decode.mix(q_lat, q[..., n:], cache, meta, self.scale)  # [B, H, L], q_lat's dtype
        return torch.bmm(mixed.transpose(0, 1), prep.w_v_t).transpose(0, 1).to(q.dtype)  # [B, H, Dh]
