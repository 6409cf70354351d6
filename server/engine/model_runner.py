"""ModelRunner: turns one scheduled step into flat tensors, runs the model, samples the finished rows."""

from __future__ import annotations

import numpy as np
import torch

from model import AttentionMetadata, CustomLLM, PagedLatentCache
from server.engine.cuda_graphs import DecodeGraphRunner
from server.engine.outputs import SampledToken, StepOutput
from server.engine.sampler import Sampler, SamplerOutput
from server.engine.sampler_state import PromptLogprob, SamplingState
from server.engine.scheduler import ScheduledSequence
from server.engine.spec_verify import verify

# Prompt rows scored per lm_head call: bounds the float32 logits to 64 x V (12.6 MB at V = 49,152).
_PROMPT_LOGITS_ROWS = 64


def _logprobs_of(out: SamplerOutput, span: slice) -> tuple[list[float] | None, list[list[tuple[int, float]]] | None]:
    """The logprobs and top logprobs of out's rows in span (one sequence's), None when it did not ask for them."""
    if out.logprobs is None or out.top_logprobs is None or out.logprobs[span.start] is None:
        return None, None
    return ([v for v in out.logprobs[span] if v is not None], [v for v in out.top_logprobs[span] if v is not None])


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
            ids += s.seq.token_ids[s.start_pos:end - len(s.draft_token_ids)] + s.draft_token_ids
            positions += range(s.start_pos, end)
            query_lens.append(s.num_new_tokens)
            context_lens.append(end)
            tables.append(s.seq.block_table)
        record_routed = self.enable_return_routed_experts and any(s.seq.routed_experts is not None
                                                                  for s in scheduled)
        routed: torch.Tensor | None  # [T, L, K] int32 when some sequence asked for its routed experts
        decode = self.decode_runner
        # Speculating decodes (1 + k tokens) join the decode path; their steps run eagerly (the graphs hold 1 each).
        max_decode_len = 1 + max(len(s.draft_token_ids) for s in scheduled)
        if decode is not None and len(ids) == len(scheduled) and decode.can_run(len(ids), tables):
            hidden, expert_counts, routed = decode.run(ids, positions, context_lens, tables, record_routed)
        else:
            meta = AttentionMetadata.build(query_lens, context_lens, tables, self.cache.block_size, self.device,
                                           max_decode_len)
            expert_counts = torch.zeros(self.num_layers, self.num_routed_experts, dtype=torch.int64,
                                        device=self.device)
            routed = (torch.empty(len(ids), self.num_layers, self.top_k, dtype=torch.int32, device=self.device)
                      if record_routed else None)
            hidden = self.model(torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device),
                                meta, self.cache.layers, expert_counts, routed)

        self._prompt_logprobs(scheduled, hidden)
        sampled = self._sample(scheduled, query_lens, hidden, max_decode_len)
        # Read back after the sampler, whose own read has waited for the forward: no extra stall.
        return StepOutput(sampled, expert_counts.tolist(), self._routed_rows(scheduled, sampled, routed))

    def _sample(self, scheduled: list[ScheduledSequence], query_lens: list[int], hidden: torch.Tensor,
                max_decode_len: int) -> list[SampledToken]:
        """The next token (or, verifying drafts, the tokens) of each sequence whose last token this step computed."""
        # A max_tokens 0 sequence (prompt logprobs only) ends when its prompt is computed: nothing to sample.
        sampling = [i for i, s in enumerate(scheduled) if s.samples and s.seq.params.max_tokens > 0]
        if not sampling:
            return []
        rows = [scheduled[i] for i in sampling]
        states = [r.seq.sampling for r in rows]
        num_generated = [r.seq.num_generated_tokens for r in rows]
        ends = torch.tensor(query_lens).cumsum(0) - 1  # row of each sequence's last token
        if max_decode_len == 1:
            logits = self.model.compute_logits(hidden[ends[sampling].to(self.device)])  # [S, V]
            out = self.sampler.sample(logits, states, num_generated, self.eos_token_id)
            return [SampledToken(r.seq, [token], *_logprobs_of(out, slice(i, i + 1)))
                    for i, (r, token) in enumerate(zip(rows, out.token_ids, strict=True))]
        return self._verify(rows, ends[sampling].tolist(), hidden, states, num_generated)

    def _verify(self, rows: list[ScheduledSequence], ends: list[int], hidden: torch.Tensor,
                states: list[SamplingState], num_generated: list[int]) -> list[SampledToken]:
        """A step with drafts: score each sampled sequence's last token and its drafts (its 1 + d last rows of
        hidden [T, D]) and keep what verification accepts."""
        drafts = [r.draft_token_ids for r in rows]
        flat_rows = [row for end, d in zip(ends, drafts, strict=True) for row in range(end - len(d), end + 1)]
        logits = self.model.compute_logits(hidden[torch.tensor(flat_rows, device=self.device)])  # [sum 1 + d, V]
        out = verify(self.sampler, logits, states, num_generated, drafts, self.eos_token_id)
        # NOTE: the cut of per-token outputs to what is kept: returned token i of the step is the one predicted at
        # flat batch row flat_rows[out.rows[i]]; rows past a sequence's returned tokens hold rejected drafts, whose
        # per-token data (logprobs here, routed experts in _routed_rows) is never read.
        sampled = []
        flat = 0
        for r, tokens in zip(rows, out.token_ids, strict=True):
            sampled.append(SampledToken(r.seq, tokens, *_logprobs_of(out.tokens, slice(flat, flat + len(tokens)))))
            flat += len(tokens)
        return sampled

    @staticmethod
    def _routed_rows(scheduled: list[ScheduledSequence], sampled: list[SampledToken],
                     routed: torch.Tensor | None) -> list[np.ndarray | None]:
        """Per scheduled sequence, in order: the rows [t, L, K] of routed [T, L, K] of the tokens it read and keeps
        if it asked for them, else None. A speculating sequence that accepted m of its d drafts keeps its rows up to
        the m-th draft: the later drafts' rows are of rejected tokens."""
        if routed is None:
            return [None] * len(scheduled)
        returned = {id(t.seq): len(t.token_ids) for t in sampled}
        # One read-back, then each asking sequence copies its rows out: on CPU .cpu() is the decode runner's static
        # buffer itself, rewritten by the next step, and a view would keep the whole step's array alive.
        host = routed.cpu().numpy()
        rows: list[np.ndarray | None] = []
        start = 0
        for s in scheduled:
            kept = s.num_new_tokens
            if s.draft_token_ids and id(s.seq) in returned:
                kept -= len(s.draft_token_ids) - (returned[id(s.seq)] - 1)
            asked = s.seq.routed_experts is not None
            rows.append(host[start:start + kept].copy() if asked else None)
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
