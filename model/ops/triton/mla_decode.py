"""Triton MLA decode over the paged latent cache: split-context flash decoding, two stages.

Shapes: B decode sequences, H heads, L latent, HR = H * rope width, F = L + HR cache entry width, S context splits,
MB blocks per block-table row, bs tokens per cache block.

The absorbed decode (model/attention.py) is multi-query attention: every head's 576-wide query (seed model) meets
the same cached entry [c_kv (L) | k_rope of all heads (HR)], and the latent c_kv is the value. So one program per
(sequence, context split) loads each cached row once and scores it for all heads in one small GEMM:
  scores [H, n] = q_lat [H, L] @ c^T + q_rope [H, HR] @ k_rope^T
where head h's q_rope is placed at its own R columns (zero elsewhere, built in registers), then keeps an online
softmax and accumulates probs @ c -> [H, L]. Stage 2 merges the splits by their log-sum-exp.

Graph-safe: the number of splits and the loop bounds come from static shapes and on-device context lengths; no
value goes back to the host. Every row needs a context of at least 1 (padding rows of a CUDA graph have 1).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_BLOCK_N = 32  # context tokens per inner iteration: 32 rows x 576 x 2 bytes = 36 KB of cache per load
_TARGET_PROGRAMS = 264  # about two programs per SM on an H200 (132 SMs), so short batches still fill the chip
# NOTE: tile sizes, split count and warps are untuned: no GPU has run this kernel yet (bench/gpu_check.sh times it).


@triton.jit
def _split_kernel(q_lat_ptr, q_rope_ptr, cache_ptr, tables_ptr, lens_ptr, part_ptr, lse_ptr,
                  stride_qlb, stride_qlh, stride_qrb, stride_qrh, stride_cs, stride_tb,
                  stride_pb, stride_ps, stride_ph, stride_lb, stride_ls,
                  scale,
                  H: tl.constexpr, L: tl.constexpr, R: tl.constexpr, PAGE: tl.constexpr, SPLIT_LEN: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    b = tl.program_id(0)
    s = tl.program_id(1)
    ctx_len = tl.load(lens_ptr + b).to(tl.int32)  # the loop bounds in one integer type
    start = s * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, ctx_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_l = tl.arange(0, BLOCK_L)
    offs_r = tl.arange(0, BLOCK_R)
    mask_h = offs_h < H
    mask_l = offs_l < L
    mask_r = offs_r < H * R
    q_lat = tl.load(q_lat_ptr + b * stride_qlb + offs_h[:, None] * stride_qlh + offs_l[None, :],
                    mask=mask_h[:, None] & mask_l[None, :], other=0.0)  # [BH, BL]
    # Head h's rope query spread over all heads' rope columns, zero outside its own R: [BH, BR].
    col = offs_r[None, :] - offs_h[:, None] * R
    q_rope = tl.load(q_rope_ptr + b * stride_qrb + offs_h[:, None] * stride_qrh + col,
                     mask=mask_h[:, None] & (col >= 0) & (col < R), other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_L], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        block = tl.load(tables_ptr + b * stride_tb + offs_n // PAGE, mask=mask_n, other=0)
        row = cache_ptr + (block.to(tl.int64) * PAGE + offs_n % PAGE)[:, None] * stride_cs  # [N, 1] row pointers
        c = tl.load(row + offs_l[None, :], mask=mask_n[:, None] & mask_l[None, :], other=0.0)  # [N, BL]
        k_rope = tl.load(row + L + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :], other=0.0)  # [N, BR]
        if UPCAST:
            q_lat, q_rope, c, k_rope = (q_lat.to(tl.float32), q_rope.to(tl.float32), c.to(tl.float32),
                                        k_rope.to(tl.float32))
        scores = tl.dot(q_lat, tl.trans(c), input_precision=PRECISION)
        scores += tl.dot(q_rope, tl.trans(k_rope), input_precision=PRECISION)  # [BH, N] float32
        scores = tl.where(mask_n[None, :], scores * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))  # finite: every iteration has a valid token
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # probs rounded to the cache dtype before the value GEMM, as the torch path does
        p = p.to(cache_ptr.dtype.element_ty)
        if UPCAST:
            p = p.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, c, input_precision=PRECISION)
        m_i = m_new

    has = l_i > 0.0  # False for a split that starts past the context
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    part = part_ptr + b * stride_pb + s * stride_ps + offs_h[:, None] * stride_ph + offs_l[None, :]
    tl.store(part, out, mask=mask_h[:, None] & mask_l[None, :])
    tl.store(lse_ptr + b * stride_lb + s * stride_ls + offs_h, lse, mask=mask_h)


@triton.jit
def _reduce_kernel(part_ptr, lse_ptr, out_ptr, stride_pb, stride_ps, stride_ph, stride_lb, stride_ls,
                   stride_ob, stride_oh,
                   L: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_l = tl.arange(0, BLOCK_L)
    mask_s = offs_s < NUM_SPLITS
    mask_l = offs_l < L
    lse = tl.load(lse_ptr + b * stride_lb + offs_s * stride_ls + h, mask=mask_s, other=float("-inf"))  # [BS]
    weight = tl.exp(lse - tl.max(lse, 0))  # split 0 is never empty (context >= 1), so the max is finite
    weight = weight / tl.sum(weight, 0)
    part = tl.load(part_ptr + b * stride_pb + offs_s[:, None] * stride_ps + h * stride_ph + offs_l[None, :],
                   mask=mask_s[:, None] & mask_l[None, :], other=0.0)  # [BS, BL]
    out = tl.sum(part * weight[:, None], 0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_l, out.to(out_ptr.dtype.element_ty), mask=mask_l)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot wants every block dimension >= 16


def num_splits_for(num_seqs: int, max_context: int) -> int:
    """Context splits per sequence: enough programs to fill the GPU, never a split shorter than _BLOCK_N."""
    by_work = -(-_TARGET_PROGRAMS // max(1, num_seqs))
    return max(1, min(by_work, -(-max_context // _BLOCK_N)))


def mla_decode(q_lat: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
               context_lens: torch.Tensor, scale: float, num_splits: int | None = None) -> torch.Tensor:
    """Mixed latents [B, H, L] = sum_s softmax_s(scale * (q_lat . c_s + q_rope . k_rope_s)) c_s per head.

    q_lat [B, H, L] and q_rope [B, H, R] (last dims contiguous); cache [num_blocks, bs, L + H*R] contiguous;
    block_tables [B, MB] int32/int64; context_lens [B] int32/int64, each >= 1.
    """
    b, h, latent = q_lat.shape
    r = q_rope.shape[-1]
    f = latent + h * r
    assert q_rope.shape == (b, h, r), f"q_rope {tuple(q_rope.shape)} for q_lat {tuple(q_lat.shape)}"
    assert cache.dim() == 3 and cache.shape[2] == f, f"cache {tuple(cache.shape)} does not hold entries of {f}"
    assert block_tables.shape[0] == b and context_lens.shape == (b,), (
        f"block_tables {tuple(block_tables.shape)} / context_lens {tuple(context_lens.shape)} for {b} sequences")
    assert q_lat.stride(-1) == 1 and q_rope.stride(-1) == 1 and cache.is_contiguous(), "rows must be contiguous"
    page = cache.shape[1]
    max_context = block_tables.shape[1] * page
    splits = num_splits or num_splits_for(b, max_context)
    split_len = -(-max_context // splits)
    split_len = -(-split_len // _BLOCK_N) * _BLOCK_N
    part = torch.empty(b, splits, h, latent, dtype=torch.float32, device=q_lat.device)
    lse = torch.empty(b, splits, h, dtype=torch.float32, device=q_lat.device)
    out = torch.empty(b, h, latent, dtype=q_lat.dtype, device=q_lat.device)
    flat = cache.view(-1, f)
    precision = "ieee" if q_lat.dtype == torch.float32 else None  # fp32 without tf32 rounding; bf16: the default
    # NOTE: Triton's interpreter (3.9) multiplies bf16 tiles wrongly in tl.dot (values off by 1e10), so under
    # TRITON_INTERPRET=1 the tiles go to float32 first: the same products (bf16 values are exact in fp32) and the
    # same float32 accumulation as the tensor-core dot, so the CPU test still checks the GPU kernel's math.
    upcast = os.environ.get("TRITON_INTERPRET") == "1" and q_lat.dtype != torch.float32
    _split_kernel[(b, splits)](
        q_lat, q_rope, flat, block_tables, context_lens, part, lse,
        q_lat.stride(0), q_lat.stride(1), q_rope.stride(0), q_rope.stride(1), flat.stride(0), block_tables.stride(0),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        scale,
        H=h, L=latent, R=r, PAGE=page, SPLIT_LEN=split_len,
        BLOCK_H=_pow2(h), BLOCK_L=_pow2(latent), BLOCK_R=_pow2(h * r), BLOCK_N=_BLOCK_N, PRECISION=precision,
        UPCAST=upcast)
    _reduce_kernel[(b, h)](
        part, lse, out, part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        L=latent, NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), BLOCK_L=_pow2(latent))
    return out
