"""ModelRunner: turns one scheduled step into flat tensors, runs the model, samples the finished rows."""

from __future__ import annotations

import numpy as np
import torch

from model import AttentionMetadata, CustomLLM, PagedLatentCache
from server.engine.cuda_graphs import DecodeGraphRunner
from server.engine.outputs import SampledToken, StepOutput
from server.engine.sampler import Sampler
from server.engine.sampler_state import PromptLogprob
from server.engine.scheduler import ScheduledSequence

# Prompt rows scored per lm_head call: bounds the float32 logits to 64 x V (12.6 MB at V = 49,152).
_PROMPT_LOGITS_ROWS = 64


class ModelRunner:
    """Owns the model, its paged latent cache and the sampler; runs on the engine thread only."""

    def __init__(self, model: CustomLLM, cache: PagedLatentCache, sampler: Sampler, eos_token_id: int,
                 decode_runner: DecodeGraphRunner | None = None, enable_return_routed_experts: bool = False) -> None:
        self.model = model
        # Whether sequences may ask for their routed experts; when none does, a step runs as without it.
        self.enable_return_routed_experts = enable_return_routed_experts
        self.decode_runner = decode_runner  # all-decode steps go through it (CUDA graphs); None = always eager
        self.cache = cache
        self.sampler = sampler
        self.eos_token_id = eos_token_id
        self.device = next(model.parameters()).device
        config = model.config
        self.num_layers = config.num_hidden_layers
        self.num_routed_experts = config.num_routed_experts
        self.top_k = config.top_k_experts

    def execute(self, scheduled: list[ScheduledSequence]) -> StepOutput:
        """Run one step: the sampled tokens, this step's tokens per (layer, routed expert) and the routed experts
        of the sequences that asked for them."""
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
        record_routed = self.enable_return_routed_experts and any(s.seq.routed_experts is not None
                                                                  for s in scheduled)
        routed: torch.Tensor | None  # [T, L, K] int32 when some sequence asked for its routed experts
        decode = self.decode_runner
        if decode is not None and len(ids) == len(scheduled) and decode.can_run(len(ids), tables):
            hidden, expert_counts, routed = decode.run(ids, positions, context_lens, tables, record_routed)
        else:
            meta = AttentionMetadata.build(query_lens, context_lens, tables, self.cache.block_size, self.device)
            expert_counts = torch.zeros(self.num_layers, self.num_routed_experts, dtype=torch.int64,
                                        device=self.device)
            routed = (torch.empty(len(ids), self.num_layers, self.top_k, dtype=torch.int32, device=self.device)
                      if record_routed else None)
            hidden = self.model(torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device),
                                meta, self.cache.layers, expert_counts, routed)

        self._prompt_logprobs(scheduled, hidden)
        sampled = self._sample(scheduled, query_lens, hidden)
        # Read back after the sampler, whose own read has waited for the forward: no extra stall.
        return StepOutput(sampled, expert_counts.tolist(), self._routed_rows(scheduled, routed))

    def _sample(self, scheduled: list[ScheduledSequence], query_lens: list[int],
                hidden: torch.Tensor) -> list[SampledToken]:
        """The next token of each sequence whose last token this step computed."""
        # A max_tokens 0 sequence (prompt logprobs only) ends when its prompt is computed: nothing to sample.
        sampling = [i for i, s in enumerate(scheduled) if s.samples and s.seq.params.max_tokens > 0]
        if not sampling:
            return []
        ends = torch.tensor(query_lens).cumsum(0) - 1  # row of each sequence's last token
        logits = self.model.compute_logits(hidden[ends[sampling].to(self.device)])  # [S, V]
        rows = [scheduled[i] for i in sampling]
        out = self.sampler.sample(logits, [r.seq.sampling for r in rows], [r.seq.num_generated_tokens for r in rows],
                                  self.eos_token_id)
        return [
            SampledToken(r.seq, token, out.logprobs[i] if out.logprobs else None,
                         out.top_logprobs[i] if out.top_logprobs else None)
            for i, (r, token) in enumerate(zip(rows, out.token_ids, strict=True))
        ]

    @staticmethod
    def _routed_rows(scheduled: list[ScheduledSequence], routed: torch.Tensor | None) -> list[np.ndarray | None]:
        """Per scheduled sequence, in order: its tokens' rows [num_new_tokens, L, K] of routed [T, L, K] if it
        asked for them, else None."""
        if routed is None:
            return [None] * len(scheduled)
        # One read-back, then each asking sequence copies its rows out: on CPU .cpu() is the decode runner's static
        # buffer itself, rewritten by the next step, and a view would keep the whole step's array alive.
        host = routed.cpu().numpy()
        rows: list[np.ndarray | None] = []
        start = 0
        for s in scheduled:
            asked = s.seq.routed_experts is not None
            rows.append(host[start:start + s.num_new_tokens].copy() if asked else None)
            start += s.num_new_tokens
        return rows

    def _prompt_logprobs(self, scheduled: list[ScheduledSequence], hidden: torch.Tensor) -> None:
        """Fill the prompt logprobs of the prompt tokens this step computed (rows of hidden [T, D])."""
        row = 0
        for s in scheduled:
            state = s.seq.sampling
            entries = state.prompt_logprobs
            # Position p's logits score prompt token p + 1; the last prompt position's logits are the sampler's.
            end = min(s.start_pos + s.num_new_tokens, s.seq.num_prompt_tokens - 1)
            if entries is not None and end > s.start_pos:
                k = state.params.prompt_logprobs or 0
                for lo in range(s.start_pos, end, _PROMPT_LOGITS_ROWS):
                    hi = min(lo + _PROMPT_LOGITS_ROWS, end)
                    lp = self.model.compute_logits(hidden[row + lo - s.start_pos:row + hi - s.start_pos])
                    lp = lp.float().log_softmax(dim=-1)  # [P, V]
                    targets = torch.tensor(s.seq.token_ids[lo + 1:hi + 1], device=lp.device)
                    chosen = lp.gather(1, targets[:, None])  # [P, 1]
                    ranks = (lp > chosen).sum(dim=-1) + 1  # [P]
                    top_v, top_i = lp.topk(k, dim=-1)  # [P, k]
                    for j, (t, c, r, tv, ti) in enumerate(zip(targets.tolist(), chosen[:, 0].tolist(),
                                                              ranks.tolist(), top_v.tolist(), top_i.tolist(),
                                                              strict=True)):
                        entries[lo + 1 + j] = PromptLogprob(t, c, r, list(zip(ti, tv, strict=True)))
            row += s.num_new_tokens
