"""The MLA decode op: absorbed attention over the paged latent cache (`--attention-backend`).

Shapes: B decode sequences, H heads, L latent, R rope width per head, F = L + H*R cache entry width,
S decode context (padded to whole blocks).

All backends compute, per sequence and head, softmax(scale * (q_lat . c_s + q_rope . k_rope_s)) over the
sequence's cached entries [c_s | k_rope_s] and return the softmax-weighted latent sum_s p_s c_s [B, H, L];
the caller folds W_k into q_lat before and expands with W_v after (model/attention.py, weight absorption).
`TorchMLADecode` (every device and dtype; the oracle) gathers whole blocks and runs two batched GEMMs.
`CppMLADecode` (CPU, bfloat16/float32; model/csrc/mla_decode.cpp) reads each entry in place through the
block table, once for all heads, with an online softmax in float32, and splits long contexts of small
batches so every thread works. `TritonMLADecode` (CUDA; model/ops/triton/mla_decode.py) does the same per
(sequence, context split) program, graph-safe.
"""

from __future__ import annotations

import abc
import importlib.util

import torch

from model.metadata import AttentionMetadata
from model.ops.registry import Backend, MakeTensor, Op, Target

# Bytes of gathered decode context per chunk of sequences: small enough to stay in this class of CPU's
# last-level cache (32 MiB here) next to everything else, big enough that per-chunk op overhead stays small.
_DECODE_CHUNK_BYTES = 6 << 20


class MLADecodeBackend(Backend, abc.ABC):
    """The interface: the softmax-weighted latent mix of each decode sequence's context."""

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the caller's absorption GEMMs (W_k into q, W_v out of the mix) should run in."""
        return dtype

    @abc.abstractmethod
    def mix(self, q_lat: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
            scale: float) -> torch.Tensor:
        """q_lat [B, H, L], q_rope [B, H, R], cache [num_blocks, block_size, F] -> [B, H, L] in q_lat's dtype."""


class TorchMLADecode(MLADecodeBackend):
    """Gather whole blocks per chunk of sequences, score with one baddbmm, mix with one bmm."""

    name = "torch"

    def mix(self, q_lat: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
            scale: float) -> torch.Tensor:
        out_dtype = q_lat.dtype
        q_lat, q_rope = q_lat.to(cache.dtype), q_rope.to(cache.dtype)  # the GEMMs below run in the cache's dtype
        b, h, latent = q_lat.shape
        r = q_rope.shape[-1]
        # Head h's query over a whole entry [c | k_rope] is [q_lat_h | 0 .. q_rope_h (head h's R slots) .. 0].
        q_entry = q_lat.new_zeros(b, h, latent + h * r)  # [B, H, F]
        q_entry[:, :, :latent] = q_lat
        q_entry[:, :, latent:].view(b, h, h, r).diagonal(dim1=1, dim2=2).copy_(q_rope.transpose(1, 2))
        bias = meta.decode_bias(q_lat.dtype)  # [B, 1, S] 0 / -inf for padding, None when nothing is padded

        # Sequences go in chunks whose gathered context stays cache-resident between the gather and the two
        # GEMMs that read it, instead of one gather of the whole batch's context.
        blocks = meta.decode_block_tables.shape[1]
        per_seq = blocks * cache[0].numel() * cache.element_size()
        chunk = max(1, min(b, _DECODE_CHUNK_BYTES // per_seq))
        workspace = meta.workspace((chunk * blocks, *cache.shape[1:]), cache.dtype)
        mixed = q_lat.new_empty(b, h, latent)  # [B, H, L]
        for start in range(0, b, chunk):
            end = min(b, start + chunk)
            # One gather of whole blocks, kept contiguous: the score GEMM reads it without another copy.
            ctx = workspace[:(end - start) * blocks]
            torch.index_select(cache, 0, meta.decode_block_ids[start * blocks:end * blocks], out=ctx)
            ctx = ctx.view(end - start, -1, cache.shape[-1])  # [b, S, F]
            # scale * q.k (+ bias), accumulated in float32 inside the GEMM and rounded once.
            scores = torch.baddbmm(q_entry.new_zeros(1, 1, 1) if bias is None else bias[start:end],
                                   q_entry[start:end], ctx.transpose(1, 2),
                                   beta=0.0 if bias is None else 1.0, alpha=scale)  # [b, H, S]
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_lat.dtype)  # softmax in float32
            torch.bmm(probs, ctx[..., :latent], out=mixed[start:end])
        return mixed.to(out_dtype)


class CppMLADecode(MLADecodeBackend):
    """The fused kernel: no gather copy, one pass over the context, float32 scores, softmax and mix."""

    name = "cpp"
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.bfloat16, torch.float32})
    needs_extension = True

    def __init__(self, num_splits: int = 0) -> None:
        self.num_splits = num_splits  # 0: the kernel picks (more splits for fewer sequences)

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float32  # the kernel takes and returns float32: no rounding between the three steps

    def mix(self, q_lat: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
            scale: float) -> torch.Tensor:
        out = torch.ops.customllm.mla_decode(q_lat.float(), q_rope.float(), cache, meta.decode_block_tables,
                                             meta.decode_context_lens, scale, self.num_splits)  # [B, H, L] f32
        return out.to(q_lat.dtype)


class TritonMLADecode(MLADecodeBackend):
    """CUDA: the split-context Triton kernel (model/ops/triton/mla_decode.py). Reads each entry in place through
    the block table, only up to each sequence's context, once for all heads; no host sync (CUDA graphs)."""

    name = "triton"
    devices = frozenset({"cuda"})

    @classmethod
    def requirement(cls, target: Target) -> str | None:
        return None if importlib.util.find_spec("triton") else "the triton package is not installed"

    def __init__(self) -> None:
        from model.ops.triton.mla_decode import mla_decode  # needs triton: imported once the backend is chosen

        self._kernel = mla_decode

    def mix(self, q_lat: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
            scale: float) -> torch.Tensor:
        return self._kernel(q_lat, q_rope, cache, meta.decode_block_tables, meta.decode_context_lens, scale)


def _case(backend: MLADecodeBackend, make: MakeTensor) -> torch.Tensor:
    """Two sequences of 7 and 9 tokens in blocks of 4 (partial last blocks, non-contiguous tables): [2, 2, 16]."""
    heads, latent, rope, block = 2, 16, 8, 4
    cache = make(6, block, latent + heads * rope)
    meta = AttentionMetadata.build([1, 1], [7, 9], [[1, 3], [2, 4, 5]], block, cache.device)
    return backend.mix(make(2, heads, latent), make(2, heads, rope), cache, meta, 0.25)


MLA_DECODE: Op[MLADecodeBackend] = Op(
    "MLA decode", "--attention-backend", (TritonMLADecode, CppMLADecode, TorchMLADecode), _case,
    {torch.float32: (1e-5, 1e-2), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-2, 2e-2)})
