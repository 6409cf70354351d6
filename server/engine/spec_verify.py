"""Verification of speculative drafts: which drafted tokens a step keeps, and the model's own token after them.

Shapes: R logits rows, V vocabulary. Sequence i with d_i drafts owns 1 + d_i consecutive rows; its row j scores
the token after its first j drafts.

Each row is processed as the plain sampler (server/engine/sampler.py) processes that position: the drafts before
it count as generated (penalties, min_tokens) and are consumed by the grammar, then logit_bias, the penalties, the
grammar mask and, for sampled rows, temperature, top-k, top-p and min-p give the row's distribution p_j. Then per
sequence, position by position:
- greedy: draft j is kept while it is row j's argmax; the first row whose argmax differs returns that argmax, and a
  sequence whose drafts all pass returns its last row's argmax: the tokens of greedy decoding without drafts.
- sampling: draft t is kept with probability p_j(t) (a draft is a point mass, so min(1, p/q) = p(t)); a rejected
  draft is replaced by a draw from p_j without t, renormalised; a sequence whose drafts all pass draws one more
  token from its last row. Each returned token is then distributed as p_j: P(t) = p(t), and for s != t,
  P(s) = (1 - p(t)) * p(s) / (1 - p(t)) = p(s).
A row without drafts draws exactly what the plain sampler draws (one Exp(1) per vocabulary entry), so a seeded
sequence for which no draft is proposed gets the same tokens as without speculation.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from server.engine.logits_processors import apply_penalties, temperature_and_filters_, to_device
from server.engine.sampler import Sampler, SamplerOutput, exponential_race_
from server.engine.sampler_state import SamplingState


@dataclass
class VerifyOutput:
    """Per sequence its returned tokens (kept drafts, then one of the model's own); `rows` are the logits rows that
    scored them, sequence by sequence, and `tokens` their token ids and logprobs, flat over those rows."""

    token_ids: list[list[int]]
    rows: list[int]
    tokens: SamplerOutput


def _with_drafts(state: SamplingState, drafts: list[int]) -> SamplingState:
    """A view of state with drafts counted as generated, for the penalties; shares params, generator, grammar."""
    view = copy.copy(state)
    view.output_counts = dict(state.output_counts)
    for t in drafts:
        view.output_counts[t] = view.output_counts.get(t, 0) + 1
    return view


def _mask_grammars(sampler: Sampler, x: Tensor, states: list[SamplingState], drafts: list[list[int]],
                   starts: list[int]) -> None:
    """Each constrained row j of x [R, V] masked by its grammar after the first j drafts; the matchers are
    advanced through the drafts round by round and rolled back at the end."""
    seqs = [i for i, s in enumerate(states) if s.matcher is not None]
    if not seqs:
        return
    for j in range(max(len(drafts[i]) for i in seqs) + 1):
        live = [i for i in seqs if j <= len(drafts[i])]
        idx = to_device([starts[i] + j for i in live], torch.long, x.device)
        sub = x[idx]  # [C, V]
        sampler.apply_grammars(sub, [states[i] for i in live])
        x[idx] = sub
        for i in live:
            if j < len(drafts[i]):
                matcher = states[i].matcher
                assert matcher is not None and matcher.consume_token(drafts[i][j]), (
                    f"draft token {drafts[i][j]} was cut to the grammar when proposed")
    for i in seqs:
        if drafts[i]:
            states[i].matcher.rollback(len(drafts[i]))  # type: ignore[union-attr]


def verify(sampler: Sampler, logits: Tensor, states: list[SamplingState], num_generated: list[int],
           drafts: list[list[int]], eos_token_id: int) -> VerifyOutput:
    """Verify each sequence's drafts against its rows of logits [R, V] (R = sum of 1 + len(drafts[i]))."""
    dev = logits.device
    starts: list[int] = []
    row_states: list[SamplingState] = []
    row_generated: list[int] = []
    row_draft: list[int] = []  # the draft token each row scores, -1 for a sequence's last row
    for state, n, d in zip(states, num_generated, drafts, strict=True):
        starts.append(len(row_states))
        for j in range(len(d) + 1):
            row_states.append(state if j == 0 or not state.params.uses_penalties else _with_drafts(state, d[:j]))
            row_generated.append(n + j)
            row_draft.append(d[j] if j < len(d) else -1)
    assert logits.shape[0] == len(row_states), f"logits {tuple(logits.shape)} for {len(row_states)} rows"

    x = apply_penalties(logits, row_states, row_generated, eos_token_id)  # [R, V] float32
    _mask_grammars(sampler, x, states, drafts, starts)
    params = [s.params for s in row_states]
    targets = x.argmax(dim=-1)  # [R]: the answer of greedy rows (random rows are overwritten below)
    keep = targets == to_device([max(t, 0) for t in row_draft], torch.long, dev)  # [R], greedy rows' verdict
    random_rows = [r for r, p in enumerate(params) if not p.greedy]
    if random_rows:
        rand_idx = to_device(random_rows, torch.long, dev)
        xr = temperature_and_filters_(x[rand_idx], [params[r] for r in random_rows])  # [Rr, V]
        drafted = [j for j, r in enumerate(random_rows) if row_draft[r] >= 0]
        if drafted:
            d_idx = to_device(drafted, torch.long, dev)
            d_tok = to_device([row_draft[random_rows[j]] for j in drafted], torch.long, dev)
            log_p = xr[d_idx].log_softmax(dim=-1).gather(1, d_tok[:, None])[:, 0]  # [Rd] log p_j(draft)
            xr[d_idx, d_tok] = -math.inf  # a replacement never repeats the rejected draft
        replacement = exponential_race_(xr, sampler.draw_noise(row_states, random_rows, xr))  # [Rr]
        targets[rand_idx] = replacement
        keep[rand_idx] = False
        if drafted:
            # Keep with probability p: u = exp(-E) is uniform for E ~ Exp(1), and u < p <=> E > -log p. The E come
            # after the replacement's noise from the same generators (seeded rows: their own).
            e = sampler.draw_noise(row_states, [random_rows[j] for j in drafted], xr.new_empty(len(drafted), 1))
            keep[rand_idx[d_idx]] = e[:, 0] > -log_p

    targets_l, keep_l = targets.tolist(), keep.tolist()
    token_ids: list[list[int]] = []
    rows: list[int] = []
    for start, d in zip(starts, drafts, strict=True):
        j = 0
        while j < len(d) and keep_l[start + j]:
            j += 1
        token_ids.append([*d[:j], targets_l[start + j]])
        rows += range(start, start + j + 1)
    flat = [t for seq_tokens in token_ids for t in seq_tokens]
    tokens = SamplerOutput(token_ids=flat)
    lp_rows = [i for i, r in enumerate(rows) if params[r].logprobs is not None]
    if lp_rows:
        # Reported logprobs: the raw model distribution at each returned token's position, as without drafts.
        raw_lp = logits[to_device([rows[i] for i in lp_rows], torch.long, dev)].float().log_softmax(dim=-1)
        sampler.fill_logprobs(tokens, raw_lp, torch.tensor(flat, device=dev), lp_rows, [params[r] for r in rows])
    return VerifyOutput(token_ids, rows, tokens)
