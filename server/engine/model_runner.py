"""ModelRunner: turns one scheduled step into flat tensors, runs the model, samples the finished rows."""

from __future__ import annotations

import dataclasses

import torch

from model import AttentionMetadata, CustomLLM, PagedLatentCache
from server.engine.cuda_graphs import DecodeGraphRunner
from server.engine.sampler import Sampler
from server.engine.sampler_state import SamplingState
from server.engine.scheduler import ScheduledSequence


@dataclasses.dataclass
class SampledToken:
    """What the step produced for one sequence whose last token it computed."""

    scheduled: ScheduledSequence
    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None


class ModelRunner:
    """Owns the model, its paged latent cache and the sampler; runs on the engine thread only."""

    def __init__(self, model: CustomLLM, cache: PagedLatentCache, sampler: Sampler, eos_token_id: int,
                 decode_runner: DecodeGraphRunner | None = None) -> None:
        self.model = model
        self.decode_runner = decode_runner  # all-decode steps go through it (CUDA graphs); None = always eager
        self.cache = cache
        self.sampler = sampler
        self.eos_token_id = eos_token_id
        self.device = next(model.parameters()).device
        config = model.config
        self.num_layers = config.num_hidden_layers
        self.num_routed_experts = config.num_routed_experts

    def execute(self, scheduled: list[ScheduledSequence]) -> tuple[list[SampledToken], list[list[int]]]:
        """Run one step. Returns the sampled tokens and this step's tokens per (layer, routed expert)."""
        ids: list[int] = []
        positions: list[int] = []
        query_lens, context_lens, tables = [], [], []
        for s in scheduled:
            end = s.start_pos + s.num_new_tokens
            ids += s.seq.token_ids[s.start_pos:end]
            positions += range(s.start_pos, end)
            query_lens.append(s.num_new_tokens)
            context_lens.append(end)
            tables.append(s.seq.block_table)
        decode = self.decode_runner
        if decode is not None and len(ids) == len(scheduled) and decode.can_run(len(ids), tables):
            hidden, expert_counts = decode.run(ids, positions, context_lens, tables)
        else:
            meta = AttentionMetadata.build(query_lens, context_lens, tables, self.cache.block_size, self.device)
            expert_counts = torch.zeros(self.num_layers, self.num_routed_experts, dtype=torch.int64,
                                        device=self.device)
            hidden = self.model(torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device),
                                meta, self.cache.layers, expert_counts)

        sampling = [i for i, s in enumerate(scheduled) if s.samples]
        if not sampling:
            return [], expert_counts.tolist()
        ends = torch.tensor(query_lens).cumsum(0) - 1  # row of each sequence's last token
        logits = self.model.compute_logits(hidden[ends[sampling].to(self.device)])  # [S, V]
        rows = [scheduled[i] for i in sampling]
        states: list[SamplingState] = [r.seq.data.sampling for r in rows]  # type: ignore[attr-defined]
        out = self.sampler.sample(logits, states, [r.seq.num_generated_tokens for r in rows], self.eos_token_id)
        sampled = [
            SampledToken(r, token, out.logprobs[i] if out.logprobs else None,
                         out.top_logprobs[i] if out.top_logprobs else None)
            for i, (r, token) in enumerate(zip(rows, out.token_ids, strict=True))
        ]
        return sampled, expert_counts.tolist()
