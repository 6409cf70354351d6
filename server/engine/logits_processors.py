"""The logit transforms of the batched sampler, each over float32 logits [B, V] (B rows, V vocabulary).

Order, as in vLLM: min_tokens mask -> logit_bias -> repetition/frequency/presence penalties (apply_penalties),
then, for rows that draw, temperature -> top_k -> top_p -> min_p (apply_temperature_and_filters).
"""

import math

import torch
from torch import Tensor

from server.engine.sampler_state import SamplingState
from server.engine.sampling_params import SamplingParams

_REP_MIN = 1e-20  # repetition_penalty is applied clamped to [_REP_MIN, 1 / _REP_MIN] (see apply_penalties)

def to_device(values: list | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    t = torch.as_tensor(values, dtype=dtype)
    if device.type == "cuda":
        # Pinned + non_blocking: the copy queues behind the forward pass instead of waiting for it.
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def apply_penalties(
    logits: Tensor, states: list[SamplingState], num_generated: list[int], eos_token_id: int
) -> Tensor:
    """Return float32 logits [B, V] after the min_tokens mask, logit_bias and penalties."""
    x = logits.to(torch.float32, copy=True)  # [B, V]; never modify the caller's tensor
    dev = x.device

    rows: list[int] = []
    toks: list[int] = []
    for r, (s, n_gen) in enumerate(zip(states, num_generated, strict=True)):
        # The grammar decides when a constrained row may end; min_tokens never fights it.
        if n_gen < s.params.min_tokens and s.matcher is None:
            banned = (eos_token_id, *s.params.stop_token_ids)
            rows += [r] * len(banned)
            toks += banned
    if rows:
        x[to_device(rows, torch.long, dev), to_device(toks, torch.long, dev)] = -math.inf

    rows, toks, vals = [], [], []
    for r, s in enumerate(states):
        for t, b in s.params.logit_bias:  # type: ignore[misc]
            rows.append(r)
            toks.append(t)
            vals.append(b)
    if rows:
        idx = (to_device(rows, torch.long, dev), to_device(toks, torch.long, dev))
        x.index_put_(idx, to_device(vals, torch.float32, dev), accumulate=True)

    pen_rows = [r for r, s in enumerate(states) if s.params.uses_penalties]
    if not pen_rows:
        return x
    pen = [states[r] for r in pen_rows]
    # Counts of generated tokens, scattered from the per-sequence dicts: [P, V].
    rows, toks = [], []
    cnts: list[int] = []
    for r, s in enumerate(pen):
        rows += [r] * len(s.output_counts)
        toks += s.output_counts.keys()
        cnts += s.output_counts.values()
    counts = torch.zeros(len(pen), x.shape[1], dtype=torch.float32, device=dev)
    if rows:
        idx = (to_device(rows, torch.long, dev), to_device(toks, torch.long, dev))
        counts[idx] = to_device(cnts, torch.float32, dev)
    seen = counts > 0  # [P, V]
    sub = x[to_device(pen_rows, torch.long, dev)]  # [P, V]

    rep_rows = [r for r, s in enumerate(pen) if s.params.repetition_penalty != 1.0]
    if rep_rows:
        # Repetition penalty covers prompt tokens too.
        prompt_ids = [pen[r].prompt_token_ids for r in rep_rows]
        lens = torch.tensor([len(p) for p in prompt_ids])
        p_rows = torch.repeat_interleave(torch.tensor(rep_rows), lens)
        in_prompt = torch.zeros_like(seen)
        p_toks = torch.cat(prompt_ids)
        in_prompt[to_device(p_rows, torch.long, dev), to_device(p_toks, torch.long, dev)] = True
        # Past 1e20 either way the penalty alone orders a seen token against the rest, as the exact value would;
        # clamped, the penalised logits stay finite in float32 also after the smallest temperature (an inf would
        # tie with every other inf, and the pick among them would be arbitrary).
        rep = to_device([min(max(s.params.repetition_penalty, _REP_MIN), 1 / _REP_MIN) for s in pen],
                        torch.float32, dev)[:, None]
        penalised = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen | in_prompt, penalised, sub)
    freq = to_device([s.params.frequency_penalty for s in pen], torch.float32, dev)[:, None]
    pres = to_device([s.params.presence_penalty for s in pen], torch.float32, dev)[:, None]
    sub = sub - freq * counts - pres * seen.float()
    x[to_device(pen_rows, torch.long, dev)] = sub
    return x


def apply_temperature_and_filters(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    """Return logits [B, V] divided by temperature with top_k/top_p/min_p masked to -inf.

    Greedy rows are left unscaled and unfiltered. Among logits tied at a top_k/top_p boundary the lowest
    token id ranks first, as in argmax.
    """
    return temperature_and_filters_(logits.to(torch.float32, copy=True), params)


def temperature_and_filters_(x: Tensor, params: list[SamplingParams]) -> Tensor:
    """apply_temperature_and_filters in place on float32 x [B, V] (a batch of vocabulary rows is tens of MB:
    every fresh tensor of that size costs page faults, so the sampler's path allocates as few as it can)."""
    dev = x.device
    V = x.shape[1]
    temps = [1.0 if p.greedy else p.temperature for p in params]
    if any(t != 1.0 for t in temps):
        x.div_(to_device(temps, torch.float32, dev)[:, None])

    # A top_k past the vocabulary keeps it all (and fits the int64 tensors below).
    ks = [min(p.top_k, V) if p.top_k > 0 and not p.greedy else V for p in params]
    # top_p == 1 means disabled; inf keeps float rounding in the cumsum from dropping tail tokens.
    ps = [p.top_p if p.top_p < 1 and not p.greedy else math.inf for p in params]
    rows = [r for r in range(len(params)) if ks[r] < V or ps[r] < 1]
    if rows:
        # Only the rows that filter pay for it.
        idx = None if len(rows) == len(params) else to_device(rows, torch.long, dev)
        sub = x if idx is None else x[idx]  # [F, V]
        cand_x, cand_i = _top_k_top_p(sub, [ks[r] for r in rows], [ps[r] for r in rows])
        sub.fill_(-math.inf).scatter_(1, cand_i, cand_x)
        if idx is not None:
            x[idx] = sub

    min_ps = [0.0 if p.greedy else p.min_p for p in params]
    if any(m > 0 for m in min_ps):
        # p_i >= min_p * p_max  <=>  logit_i - logit_max >= log(min_p); no softmax needed. The log is taken in
        # float64: a min_p below float32's range (1e-46) still has a finite log (-106), and 0 keeps all.
        log_min_p = to_device([math.log(m) if m > 0 else -math.inf for m in min_ps], torch.float32, dev)[:, None]
        x.masked_fill_(x - x.amax(dim=-1, keepdim=True) < log_min_p, -math.inf)
    return x


# Top-p without top-k ranks only this many leading candidates per row, widening in these steps, as soon as
# their probability mass reaches top_p (usually at the first step); otherwise, or when ties straddle the
# cut, the whole vocabulary is sorted (hundreds of ms for 64 rows on a CPU).
_TOP_P_WIDTHS = (256, 4096)


def _top_k_top_p(x: Tensor, ks: list[int], ps: list[float]) -> tuple[Tensor, Tensor]:
    """Each row's ranked candidate logits [F, W] (masked to -inf past top_k, then past the top_p nucleus of
    the top_k distribution) and their token ids [F, W]; every token not among them is masked too."""
    dev = x.device
    V = x.shape[1]
    k_t = to_device(ks, torch.long, dev)[:, None]  # [F, 1]
    p_t = to_device(ps, torch.float32, dev)[:, None]
    # NOTE: the shortcut costs a host sync or two; only on the CPU does the full sort it avoids dominate a step
    # (an accelerator sorts the vocabulary quickly and should not wait on the host).
    head = _head_candidates(x, ks, ps, k_t, p_t) if dev.type == "cpu" else None
    if head is None:
        cand_x, cand_i = x.sort(dim=-1, descending=True, stable=True)  # [F, V]
        cand_x = cand_x.masked_fill(torch.arange(V, device=dev) >= k_t, -math.inf)
        probs = cand_x.softmax(dim=-1)  # the top-k distribution (all of the row without a top_k)
    else:
        cand_x, cand_i, probs = head
    # Drop a token once the mass ranked above it reaches top_p. Rank 0 always survives, also when top_p
    # rounds to 0 in float32 (below 1e-45).
    drop = probs.cumsum(dim=-1) - probs >= p_t
    drop[:, 0] = False
    return cand_x.masked_fill(drop, -math.inf), cand_i


def _head_candidates(
    x: Tensor, ks: list[int], ps: list[float], k_t: Tensor, p_t: Tensor,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """The leading candidates of x [F, V] when they decide every row's filters: ranked logits [F, W] masked past
    top_k, their ids [F, W] and their probabilities under each row's top-k distribution (the whole row's
    distribution for a row without a top_k). None when the whole vocabulary must be sorted instead."""
    V = x.shape[1]
    all_top_k = max(ks) < V
    if all_top_k:
        widths: tuple[int, ...] = (max(ks),)  # the candidates hold every row's top-k distribution
    elif all(p < 1 for p in ps):
        # The rows without a top_k need candidates holding top_p of their mass; the others their top_k.
        widths = tuple(w for w in _TOP_P_WIDTHS if w >= max((k for k in ks if k < V), default=0))
    else:
        return None  # top_k-only rows beside top_p-only rows: no head decides both
    if not widths:
        return None  # a top_k wider than every step
    full_log_norm = None if all_top_k else x.logsumexp(dim=-1, keepdim=True)  # [F, 1]
    for width in widths:
        cand_x, cand_i = _ranked_candidates(x, width)
        if cand_x is None:
            continue
        cand_x = cand_x.masked_fill(torch.arange(width, device=x.device) >= k_t, -math.inf)
        # Normalise each row over its top-k, or, without one, over the whole row (of which these are the head).
        log_norm = cand_x.logsumexp(dim=-1, keepdim=True)  # [F, 1]
        if full_log_norm is not None:
            log_norm = torch.where(k_t < V, log_norm, full_log_norm)
        probs = (cand_x - log_norm).exp()
        if full_log_norm is None or bool((probs.sum(dim=-1, keepdim=True) >= p_t).all()):
            return cand_x, cand_i, probs
    return None


def _ranked_candidates(x: Tensor, width: int) -> tuple[Tensor | None, Tensor]:
    """The `width` largest logits per row [F, W] and their ids, ranked (ties: lowest id first).

    None when a tie straddles the cut (some of the tied ids would be left out) or width covers the row.
    """
    if width >= x.shape[1]:
        return None, x.new_empty(0, dtype=torch.long)
    vals, ids = x.topk(width, dim=-1)  # [F, W]; topk's order among ties is unspecified
    if bool(((x >= vals[:, -1:]).sum(dim=-1) > width).any()):
        return None, ids
    ids = ids.sort(dim=-1).values  # ascending ids, then a stable sort by value
    vals, order = x.gather(1, ids).sort(dim=-1, descending=True, stable=True)
    return vals, ids.gather(1, order)
