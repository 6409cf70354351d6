"""Decode steps over static buffers, replayed as CUDA graphs on GPU.

Shapes: b decode sequences in the step, B its bucket (the captured batch size >= b), MB block-table width
(max_model_len / block_size), D hidden, E routed experts, L layers, K routed experts per token.

Why: a decode step of this 1B model launches ~1.5-2k kernels (30 layers); at 5-10 us per launch that is 10-20 ms
against a 0.19 ms bandwidth bound on an H200. A CUDA graph replays the whole step as one launch.

How: every input of a decode step lives in one static device buffer (ids, positions, slot mapping, context lengths,
block tables), written by one host-to-device copy per step. A step of b sequences runs the graph captured for the
smallest bucket B >= b; rows b..B are padding: token 0 at position 0 with a context of 1 (so no row is all-masked),
writing and reading only one slot of a reserved scratch block that no sequence owns. The forward must never read a
value back to the host (AttentionMetadata.graph_safe, the graph-safe MoE). Prefill and mixed steps stay eager;
logits and the sampler run after the replay, on the b real rows. A step with a sequence that asked for its routed
experts replays a second graph of the bucket, which also writes every token's top-k expert ids to a static
[B, L, K] buffer (captured at start-up with --enable-return-routed-experts): steps where nobody asks replay the same
graph as without the flag.
On CPU (or with --enforce-eager) the same static-buffer path runs eagerly, which is how tests check it.

NOTE: a captured graph holds the addresses of the model's processed weights and of the cache, so capture comes
after `process_weights` (weights are processed once, and never replaced afterwards).

Threading: engine thread only. The hidden states returned by `run` are a view into the static output, valid until
the next `run`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch

from model import AttentionMetadata, CustomLLM

logger = logging.getLogger(__name__)

_FIELDS = 4  # ids, positions, slot mapping, context lengths; the block tables follow them in the buffer


@dataclasses.dataclass
class StaticDecodeMetadata(AttentionMetadata):
    """Decode metadata over the runner's static buffers. Its derived values are plain properties: a
    functools.cached_property takes a lock (Python 3.11) that torch.compile cannot trace, and a graph computes
    each value once, at capture, anyway."""

    context_lens: torch.Tensor | None = None  # [B] int64, the static buffer's view

    @property
    def decode_block_ids(self) -> torch.Tensor:
        return self.decode_block_tables.flatten()

    @property
    def decode_context_lens(self) -> torch.Tensor:
        assert self.context_lens is not None
        return self.context_lens


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch-size buckets: 1, 2, 4, 8, then steps of 16 up to max_num_seqs (which is always one)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return [*sizes, max_num_seqs]


class DecodeGraphRunner:
    """Runs all-decode steps of up to max_num_seqs sequences through per-bucket static buffers (graphs on CUDA)."""

    def __init__(self, model: CustomLLM, caches: list[torch.Tensor], *, max_num_seqs: int, max_blocks_per_seq: int,
                 block_size: int, scratch_block: int, use_cuda_graphs: bool,
                 record_routed_experts: bool = False) -> None:
        device = caches[0].device
        assert not use_cuda_graphs or device.type == "cuda", f"CUDA graphs need a CUDA cache, not {device}"
        assert 0 <= scratch_block < caches[0].shape[0], f"scratch block {scratch_block} outside the cache"
        self.model = model
        self.caches = caches
        self.max_num_seqs = max_num_seqs
        self.max_blocks = max_blocks_per_seq
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.use_cuda_graphs = use_cuda_graphs
        self.record_routed_experts = record_routed_experts  # capture_all also prepares the recording graphs
        self.buckets = capture_sizes(max_num_seqs)
        config = model.config
        width = _FIELDS * max_num_seqs + max_num_seqs * max_blocks_per_seq
        # One host staging buffer (pinned on CUDA, so the copy is asynchronous) and its device twin. NOTE: the host
        # side is rewritten only after the previous step's results were read on the host (the sampler), by which
        # time its copy has long finished.
        self._host = torch.empty(width, dtype=torch.int64, pin_memory=device.type == "cuda")
        self._device = torch.empty(width, dtype=torch.int64, device=device)
        self._positions_range = torch.arange(max_blocks_per_seq * block_size, device=device)  # [MB * bs]
        self._empty = torch.zeros(0, dtype=torch.int64, device=device)
        self._expert_counts = torch.zeros(config.num_hidden_layers, config.num_routed_experts, dtype=torch.int64,
                                          device=device)
        self._routed_experts = torch.zeros(max_num_seqs, config.num_hidden_layers, config.top_k_experts,
                                           dtype=torch.int32, device=device)
        # (bucket, records routed experts) -> its graph and static output
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._prepared: set[tuple[int, bool]] = set()
        self._pad_counts: dict[int, torch.Tensor] = {}  # bucket -> expert counts of one padding row [layers, E]
        self._pool: Any = None  # the graphs' shared memory pool (torch.cuda's private handle type)
        self._fill_host([], [], [], [], 0, max_num_seqs)
        self._device.copy_(self._host)

    # -- the static buffers ----------------------------------------------------------------------

    def _view(self, field: int, rows: int) -> torch.Tensor:
        n = self.max_num_seqs
        return self._device[field * n:field * n + rows]

    def _tables(self, rows: int) -> torch.Tensor:
        n = self.max_num_seqs
        return self._device[_FIELDS * n:].view(n, self.max_blocks)[:rows]  # [B, MB], rows contiguous

    def _fill_host(self, ids: Sequence[int], positions: Sequence[int], context_lens: Sequence[int],
                   tables: Sequence[Sequence[int]], b: int, bucket: int) -> None:
        """Rows [0, b) from the step, rows [b, bucket) padding; rows past the bucket are never read."""
        n, host, bs = self.max_num_seqs, self._host, self.block_size
        table_rows = host[_FIELDS * n:].view(n, self.max_blocks)
        table_rows[:bucket] = self.scratch_block  # table entries past a context point at the scratch block
        if b:
            # One tensor of the used table width (not the full max_model_len width): one list-to-tensor call.
            width = max(len(t) for t in tables)
            table_rows[:b, :width] = torch.tensor([[*t, *[self.scratch_block] * (width - len(t))] for t in tables],
                                                  dtype=torch.int64)
            lens = torch.tensor(context_lens, dtype=torch.int64)
            last = lens - 1  # each sequence's new token sits at position context_len - 1
            host[0:b] = torch.tensor(ids, dtype=torch.int64)
            host[n:n + b] = torch.tensor(positions, dtype=torch.int64)
            host[2 * n:2 * n + b] = table_rows[torch.arange(b), last // bs] * bs + last % bs
            host[3 * n:3 * n + b] = lens
        host[b:bucket] = 0  # padding: token 0 at position 0 ...
        host[n + b:n + bucket] = 0
        host[2 * n + b:2 * n + bucket] = self.scratch_block * bs  # ... writing the scratch block's first slot
        host[3 * n + b:3 * n + bucket] = 1  # ... and reading only that slot

    def _forward(self, bucket: int, record_routed: bool) -> torch.Tensor:
        """The decode forward over the first `bucket` rows of the static buffers: hidden states [B, D] (and, when
        record_routed, the routed experts [B, L, K] in their static buffer)."""
        lens = self._view(3, bucket)
        meta = StaticDecodeMetadata(
            slot_mapping=self._view(2, bucket), num_prefill_tokens=0, prefill_query_lens=[], prefill_context_lens=[],
            prefill_context_slots=self._empty, decode_block_tables=self._tables(bucket),
            decode_valid=self._positions_range[None, :] < lens[:, None], graph_safe=True, context_lens=lens)
        self._expert_counts.zero_()
        routed = self._routed_experts[:bucket] if record_routed else None
        return self.model(self._view(0, bucket), self._view(1, bucket), meta, self.caches, self._expert_counts,
                          routed)

    # -- buckets ------------------------------------------------------------------------------------

    def bucket_for(self, num_seqs: int) -> int:
        return next(b for b in self.buckets if b >= num_seqs)

    def can_run(self, num_seqs: int, tables: Sequence[Sequence[int]]) -> bool:
        return 1 <= num_seqs <= self.max_num_seqs and all(len(t) <= self.max_blocks for t in tables)

    def _prepare_bucket(self, bucket: int, record_routed: bool = False) -> None:
        """Capture the bucket's graph (CUDA) and measure what one padding row adds to the expert counts."""
        self._fill_host([], [], [], [], 0, bucket)
        self._device.copy_(self._host, non_blocking=True)
        if self.use_cuda_graphs:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the capture: Triton compiles, cuBLAS picks kernels
                for _ in range(2):
                    self._forward(bucket, record_routed)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._forward(bucket, record_routed)
            self._pool = graph.pool()
            self._graphs[bucket, record_routed] = (graph, out)
            graph.replay()
        else:
            self._forward(bucket, record_routed)
        self._prepared.add((bucket, record_routed))
        # Every padding row is the same token at the same position over the same one-slot context, so each routes
        # the same way; their share is subtracted from a step's counts.
        counts = self._expert_counts.clone()
        if not bool((counts % bucket == 0).all()):
            logger.warning("padding rows of decode bucket %d routed differently; its expert counts are approximate",
                           bucket)
        self._pad_counts[bucket] = counts // bucket

    def capture_all(self) -> None:
        """Prepare every bucket, largest first, so the smaller graphs fit in the memory pool the largest made."""
        for bucket in reversed(self.buckets):
            self._prepare_bucket(bucket)
            if self.record_routed_experts:
                self._prepare_bucket(bucket, record_routed=True)
        if self.use_cuda_graphs:
            logger.info("captured %d decode CUDA graphs, batch sizes %s", len(self._graphs), self.buckets)

    def run(self, ids: Sequence[int], positions: Sequence[int], context_lens: Sequence[int],
            tables: Sequence[Sequence[int]], record_routed: bool = False,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One decode step of b sequences: hidden states [b, D], the step's expert counts [layers, E] and, when
        record_routed, the routed experts [b, L, K] (like the hidden states, a view valid until the next run)."""
        b = len(ids)
        assert self.can_run(b, tables), f"{b} sequences / block tables do not fit the decode runner"
        bucket = self.bucket_for(b)
        if (bucket, record_routed) not in self._prepared:
            self._prepare_bucket(bucket, record_routed)
        self._fill_host(ids, positions, context_lens, tables, b, bucket)
        self._device.copy_(self._host, non_blocking=True)
        if self.use_cuda_graphs:
            graph, out = self._graphs[bucket, record_routed]
            graph.replay()
        else:
            out = self._forward(bucket, record_routed)
        counts = self._expert_counts - (bucket - b) * self._pad_counts[bucket]
        return out[:b], counts, self._routed_experts[:b] if record_routed else None
