"""AttentionMetadata: how a flat batch of tokens splits into sequences and where their cache lives.

A flat batch is the concatenation of each scheduled sequence's new tokens. The sequences may come in any
order; the longest run of decode sequences at the end of the batch (at most max_decode_query_len new tokens each:
1, or 1 + k with k speculative drafts) takes the decode path (absorbed attention over the latent), everything
before it takes the prefill path (decompressed attention). The scheduler puts prefill chunks first so that all
decodes form that tail.

The decode path has one row per token: a sequence's j-th new token of Q sees its context up to itself (context
length C - Q + 1 + j for C in all), so the drafts of a speculating sequence are causal among themselves and every
decode backend, written for one query per row, takes them unchanged. The cost: each row reads its context, so a
sequence's Q rows read the shared prefix Q times (from the last-level cache after the first, at this model's
context sizes).
"""

from __future__ import annotations

import dataclasses
import functools

import torch


@dataclasses.dataclass
class AttentionMetadata:
    """Per-step attention inputs, shared by every layer. Built once per step by `build`."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot each new token's latent is written to
    num_prefill_tokens: int  # tokens [0, num_prefill_tokens) use the prefill path
    # Prefill path, per prefill sequence i (Q_i new tokens, C_i tokens of context including them):
    prefill_query_lens: list[int]  # Q_i
    prefill_context_lens: list[int]  # C_i
    prefill_context_slots: torch.Tensor  # [sum C_i] int64: cache slots of every context token, sequence by sequence
    # Decode path, per decode row (one per decode token; B rows):
    decode_block_tables: torch.Tensor  # [B, max_blocks] int64, padded with block 0 (a sequence's rows share it)
    decode_valid: torch.Tensor  # [B, max_blocks * block_size] bool: True where the position is in the context
    # Built from static device buffers (server/engine/cuda_graphs.py): nothing may read a value back to the host,
    # so a CUDA graph can capture the step; derived tensors are then computed without shortcuts that look at values.
    graph_safe: bool = False

    # Derived once per step and shared by every layer (see the cached properties and methods below).
    _bias_cache: dict[torch.dtype, torch.Tensor | None] = dataclasses.field(default_factory=dict, repr=False,
                                                                           compare=False)
    _workspaces: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] = dataclasses.field(
        default_factory=dict, repr=False, compare=False)

    @functools.cached_property
    def decode_block_ids(self) -> torch.Tensor:
        """[B * max_blocks] int64: the decode block tables flattened, for one gather of whole blocks."""
        return self.decode_block_tables.flatten()

    @functools.cached_property
    def decode_context_lens(self) -> torch.Tensor:
        """[B] int64: context tokens of each decode sequence (the new token included)."""
        return self.decode_valid.sum(dim=1)

    def workspace(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A scratch tensor for this step, shared by every layer (each layer overwrites it before reading).

        Reusing one buffer avoids allocating (and page-faulting) a fresh multi-MB tensor per layer.
        """
        key = (shape, dtype)
        if key not in self._workspaces:
            self._workspaces[key] = torch.empty(shape, dtype=dtype, device=self.slot_mapping.device)
        return self._workspaces[key]

    def decode_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """[B, 1, S] additive score mask (0 in the context, -inf past it), or None when no sequence is padded."""
        if dtype not in self._bias_cache:
            valid = self.decode_valid
            bias = None
            if self.graph_safe or not bool(valid.all()):
                bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
                bias.masked_fill_(~valid, float("-inf"))
                bias = bias[:, None, :]
            self._bias_cache[dtype] = bias
        return self._bias_cache[dtype]

    @classmethod
    def build(cls, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
              block_size: int, device: torch.device | str = "cpu", max_decode_query_len: int = 1) -> AttentionMetadata:
        """From per-sequence new-token counts, total context lengths (cached + new) and block tables; the trailing
        sequences of at most max_decode_query_len new tokens take the decode path."""
        assert len(query_lens) == len(context_lens) == len(block_tables), "one entry per sequence"
        num_seqs = len(query_lens)
        num_prefill_seqs = num_seqs
        while num_prefill_seqs > 0 and query_lens[num_prefill_seqs - 1] <= max_decode_query_len:
            num_prefill_seqs -= 1

        slots: list[torch.Tensor] = []
        prefill_slots: list[torch.Tensor] = []
        decode_slots: list[int] = []  # plain ints: decode sequences are most of a big batch
        decode_lens: list[int] = []  # per decode row
        decode_tables: list[list[int]] = []
        for i, (q_len, ctx_len, table) in enumerate(zip(query_lens, context_lens, block_tables, strict=True)):
            assert 1 <= q_len <= ctx_len, f"sequence {i}: query_len={q_len} context_len={ctx_len}"
            assert len(table) * block_size >= ctx_len, (
                f"sequence {i}: {len(table)} blocks of {block_size} cannot hold {ctx_len} tokens")
            if i < num_prefill_seqs:
                table_t = torch.tensor(table, dtype=torch.int64)
                # Slots of all context tokens: block b holds positions [b*bs, (b+1)*bs).
                ctx_slots = (table_t[:, None] * block_size + torch.arange(block_size)).flatten()[:ctx_len]
                slots.append(ctx_slots[ctx_len - q_len:])
                prefill_slots.append(ctx_slots)
            else:
                for pos in range(ctx_len - q_len, ctx_len):  # one row per new token, seeing up to itself
                    decode_slots.append(table[pos // block_size] * block_size + pos % block_size)
                    decode_lens.append(pos + 1)
                    decode_tables.append(table)
        if decode_slots:
            slots.append(torch.tensor(decode_slots, dtype=torch.int64))

        max_blocks = max((len(t) for t in decode_tables), default=0)
        padded = torch.tensor([list(t) + [0] * (max_blocks - len(t)) for t in decode_tables],
                              dtype=torch.int64).view(len(decode_tables), max_blocks)
        decode_valid = (torch.arange(max_blocks * block_size)[None, :]
                        < torch.tensor(decode_lens, dtype=torch.int64)[:, None])

        def to(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        empty = torch.zeros(0, dtype=torch.int64)
        return cls(
            slot_mapping=to(torch.cat(slots) if slots else empty),
            num_prefill_tokens=sum(query_lens[:num_prefill_seqs]),
            prefill_query_lens=list(query_lens[:num_prefill_seqs]),
            prefill_context_lens=list(context_lens[:num_prefill_seqs]),
            prefill_context_slots=to(torch.cat(prefill_slots) if prefill_slots else empty),
            decode_block_tables=to(padded),
            decode_valid=to(decode_valid),
        )
