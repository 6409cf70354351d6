"""Sampling parameters, per-sequence sampling state and the batched sampler.

Shapes: B rows in the batch (one per sequence being sampled), V vocabulary size.
Order of operations, as in vLLM: raw logprobs -> min_tokens mask -> logit_bias ->
repetition/frequency/presence penalties -> greedy argmax, or temperature -> top_k ->
top_p -> min_p -> inverse-CDF draw (one uniform per row).
"""

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

# Temperatures below this are treated as greedy (dividing by them would overflow).
_GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20


def _check(ok: bool, field: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"{field} must be {expected}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _in(value: object, lo: float, hi: float) -> bool:
    # Written as a chained comparison so NaN fails it.
    return _is_num(value) and lo <= value <= hi  # type: ignore[operator]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request; immutable and validated on construction."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # Accepts a mapping or (token_id, bias) pairs; stored as sorted pairs.
    logit_bias: tuple[tuple[int, float], ...] | Mapping[int, float] = ()
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs besides the sampled token
    # Carried for the detokenizer; the sampler ignores them.
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        _check(_is_int(self.n) and 1 <= self.n <= 16, "n", self.n, "an integer in 1..16")
        _check(_in(self.temperature, 0, 100), "temperature", self.temperature, "in [0, 100]")
        _check(_in(self.top_p, 0, 1) and self.top_p > 0, "top_p", self.top_p, "in (0, 1]")
        _check(
            _is_int(self.top_k) and (self.top_k in (-1, 0) or self.top_k >= 1),
            "top_k", self.top_k, "-1 or 0 (disabled) or a positive integer",
        )
        _check(_in(self.min_p, 0, 1), "min_p", self.min_p, "in [0, 1]")
        for field in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, field)
            _check(_in(value, -2, 2), field, value, "in [-2, 2]")
        rp = self.repetition_penalty
        _check(_is_num(rp) and 0 < rp < math.inf, "repetition_penalty", rp, "> 0 and finite")
        object.__setattr__(self, "logit_bias", _normalise_logit_bias(self.logit_bias))  # type: ignore[arg-type]
        _check(
            self.seed is None or (_is_int(self.seed) and -(2**63) <= self.seed < 2**64),
            "seed", self.seed, "None or a 64-bit integer",
        )
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1,
               "max_tokens", self.max_tokens, "an integer >= 1")
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
               "min_tokens", self.min_tokens, f"an integer in 0..max_tokens ({self.max_tokens})")
        stop_ids = tuple(self.stop_token_ids)
        _check(all(_is_int(t) for t in stop_ids), "stop_token_ids", stop_ids, "integers")
        object.__setattr__(self, "stop_token_ids", stop_ids)
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "a bool")
        _check(
            self.logprobs is None
            or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
            "logprobs", self.logprobs, f"None or an integer in 0..{MAX_LOGPROBS}",
        )
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        _check(all(isinstance(s, str) and s for s in stop), "stop", stop, "non-empty strings")
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        """True when the sampler takes the argmax instead of drawing."""
        return self.temperature < _GREEDY_EPS

    @property
    def uses_penalties(self) -> bool:
        """True when any of the three repetition-type penalties is active."""
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0)

    def child(self, index: int) -> "SamplingParams":
        """Params for the index-th of n sequences: n=1 and, if seeded, seed+index so they differ."""
        seed = None if self.seed is None else (self.seed + index) % 2**64
        return replace(self, n=1, seed=seed)

    def validate_token_ids(self, vocab_size: int) -> None:
        """Raise ValueError naming the field if a logit_bias/stop_token_ids id is out of vocab."""
        for field, ids in (("logit_bias", [t for t, _ in self.logit_bias]),  # type: ignore[misc]
                           ("stop_token_ids", self.stop_token_ids)):
            for t in ids:
                _check(0 <= t < vocab_size, field, t, f"a token id in [0, {vocab_size})")


def _normalise_logit_bias(
    bias: Mapping[int | str, float] | Iterable[tuple[int, float]],
) -> tuple[tuple[int, float], ...]:
    # JSON object keys arrive as strings ("50256"), so decimal strings are accepted too.
    items = bias.items() if isinstance(bias, Mapping) else bias
    out: dict[int, float] = {}
    for raw_key, value in items:
        key = int(raw_key) if isinstance(raw_key, str) and raw_key.lstrip("-").isdigit() else raw_key
        _check(_is_int(key), "logit_bias", key, "keyed by integer token ids")
        _check(_in(value, -100, 100), "logit_bias", {key: value}, "values in [-100, 100]")
        out[key] = float(value)  # type: ignore[index]
    return tuple(sorted(out.items()))


class SamplingState:
    """Per-sequence sampler state: params, private generator, output token counts, prompt ids."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_token_ids: Sequence[int] = (),
        device: torch.device | str = "cpu",
    ) -> None:
        self.params = params
        # Seeded once here; lives with the sequence so preemption resumes the same stream.
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)
        self.prompt_token_ids = torch.tensor(sorted(set(prompt_token_ids)), dtype=torch.long)
        self.output_counts: dict[int, int] = {}

    def append_token(self, token_id: int) -> None:
        """Record a generated token for the frequency/presence/repetition penalties."""
        self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1


def _to_device(values: list | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
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
        if n_gen < s.params.min_tokens:
            banned = (eos_token_id, *s.params.stop_token_ids)
            rows += [r] * len(banned)
            toks += banned
    if rows:
        x[_to_device(rows, torch.long, dev), _to_device(toks, torch.long, dev)] = -math.inf

    rows, toks, vals = [], [], []
    for r, s in enumerate(states):
        for t, b in s.params.logit_bias:  # type: ignore[misc]
            rows.append(r)
            toks.append(t)
            vals.append(b)
    if rows:
        idx = (_to_device(rows, torch.long, dev), _to_device(toks, torch.long, dev))
        x.index_put_(idx, _to_device(vals, torch.float32, dev), accumulate=True)

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
        idx = (_to_device(rows, torch.long, dev), _to_device(toks, torch.long, dev))
        counts[idx] = _to_device(cnts, torch.float32, dev)
    seen = counts > 0  # [P, V]
    sub = x[_to_device(pen_rows, torch.long, dev)]  # [P, V]

    rep_rows = [r for r, s in enumerate(pen) if s.params.repetition_penalty != 1.0]
    if rep_rows:
        # Repetition penalty covers prompt tokens too.
        prompt_ids = [pen[r].prompt_token_ids for r in rep_rows]
        lens = torch.tensor([len(p) for p in prompt_ids])
        p_rows = torch.repeat_interleave(torch.tensor(rep_rows), lens)
        in_prompt = torch.zeros_like(seen)
        p_toks = torch.cat(prompt_ids)
        in_prompt[_to_device(p_rows, torch.long, dev), _to_device(p_toks, torch.long, dev)] = True
        rep = _to_device([s.params.repetition_penalty for s in pen], torch.float32, dev)[:, None]
        penalised = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen | in_prompt, penalised, sub)
    freq = _to_device([s.params.frequency_penalty for s in pen], torch.float32, dev)[:, None]
    pres = _to_device([s.params.presence_penalty for s in pen], torch.float32, dev)[:, None]
    sub = sub - freq * counts - pres * seen.float()
    x[_to_device(pen_rows, torch.long, dev)] = sub
    return x


def apply_temperature_and_filters(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    """Return logits [B, V] divided by temperature with top_k/top_p/min_p masked to -inf.

    Greedy rows are left unscaled and unfiltered. Among logits tied at a top_k/top_p boundary the lowest
    token id ranks first, as in argmax.
    """
    return _temperature_and_filters_(logits.to(torch.float32, copy=True), params)


def _temperature_and_filters_(x: Tensor, params: list[SamplingParams]) -> Tensor:
    """apply_temperature_and_filters in place on float32 x [B, V] (a batch of vocabulary rows is tens of MB:
    every fresh tensor of that size costs page faults, so the sampler's path allocates as few as it can)."""
    dev = x.device
    V = x.shape[1]
    temps = [1.0 if p.greedy else p.temperature for p in params]
    if any(t != 1.0 for t in temps):
        x.div_(_to_device(temps, torch.float32, dev)[:, None])

    ks = [p.top_k if p.top_k > 0 and not p.greedy else V for p in params]
    # top_p == 1 means disabled; inf keeps float rounding in the cumsum from dropping tail tokens.
    ps = [p.top_p if p.top_p < 1 and not p.greedy else math.inf for p in params]
    rows = [r for r in range(len(params)) if ks[r] < V or ps[r] < 1]
    if rows:
        # Only the rows that filter pay for it.
        idx = None if len(rows) == len(params) else _to_device(rows, torch.long, dev)
        sub = x if idx is None else x[idx]  # [F, V]
        cand_x, cand_i = _top_k_top_p(sub, [ks[r] for r in rows], [ps[r] for r in rows])
        sub.fill_(-math.inf).scatter_(1, cand_i, cand_x)
        if idx is not None:
            x[idx] = sub

    min_ps = [0.0 if p.greedy else p.min_p for p in params]
    if any(m > 0 for m in min_ps):
        # p_i >= min_p * p_max  <=>  logit_i - logit_max >= log(min_p); no softmax needed.
        log_min_p = _to_device(min_ps, torch.float32, dev).log()[:, None]  # log(0) = -inf keeps all
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
    k_t = _to_device(ks, torch.long, dev)[:, None]  # [F, 1]
    p_t = _to_device(ps, torch.float32, dev)[:, None]
    width = max(ks)
    log_norm = None  # log of each row's softmax normaliser, when the candidates are the head of the row
    ranked: tuple[Tensor | None, Tensor] = (None, x)
    # NOTE: the shortcuts cost a host sync or two; only on the CPU does the full sort they avoid dominate
    # a step (an accelerator sorts the vocabulary quickly and should not wait on the host).
    if dev.type == "cpu" and width < V:
        ranked = _ranked_candidates(x, width)
    elif dev.type == "cpu" and all(p < 1 for p in ps):
        # Top-p only: the candidates must hold top_p of the full distribution's mass.
        log_norm = x.logsumexp(dim=-1, keepdim=True)  # [F, 1]
        for width in _TOP_P_WIDTHS:
            ranked = _ranked_candidates(x, width)
            cand_x = ranked[0]
            if cand_x is not None and bool(((cand_x - log_norm).exp().sum(dim=-1, keepdim=True) >= p_t).all()):
                break
            ranked = (None, x)
    cand_x, cand_i = ranked
    if cand_x is None:
        cand_x, cand_i = x.sort(dim=-1, descending=True, stable=True)  # [F, V]
        width, log_norm = V, None
    rank = torch.arange(width, device=dev)
    cand_x = cand_x.masked_fill(rank >= k_t, -math.inf)  # [F, W]
    if log_norm is None:
        probs = cand_x.softmax(dim=-1)  # the top-k distribution
    else:
        probs = (cand_x - log_norm).exp()  # no top-k: the full distribution, of which these are the head
    # Drop a token once the mass ranked above it reaches top_p; rank 0 always survives.
    mass_before = probs.cumsum(dim=-1) - probs
    return cand_x.masked_fill(mass_before >= p_t, -math.inf), cand_i


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


def _inverse_cdf_(logits: Tensor, u: Tensor) -> Tensor:
    """Token ids [R], one drawn per row of softmax(logits) [R, V] with its uniform u [R] in [0, 1): the first
    token whose cumulative probability exceeds u. One exp and one cumsum, in place over logits; no per-token
    noise. The cumulative sum is left unnormalised (u is scaled by the row total instead)."""
    cdf = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_().cumsum_(dim=-1)  # [R, V]
    total = cdf[:, -1:]
    target = (u[:, None] * total).to(cdf.dtype)
    # Strictly below the total, so the search stops at a token of non-zero probability.
    target = torch.minimum(target, total.nextafter(torch.zeros_like(total)))
    ids = torch.searchsorted(cdf, target, right=True)[:, 0]  # first index with cdf > target
    return ids.clamp_(max=logits.shape[1] - 1)


@dataclass
class SamplerOutput:
    """Per-row results; logprob entries are None for rows that did not ask for logprobs."""

    token_ids: list[int]
    logprobs: list[float | None] | None = None
    top_logprobs: list[list[tuple[int, float]] | None] | None = None


class Sampler:
    """Batched sampler; unseeded rows share one generator per device, seeded from `seed`."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _default_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            g = torch.Generator(device=device)
            if self.seed is None:
                g.seed()
            else:
                g.manual_seed(self.seed)
            self._generators[device] = g
        return self._generators[device]

    def __call__(
        self, logits: Tensor, states: list[SamplingState], num_generated: list[int],
        eos_token_id: int,
    ) -> SamplerOutput:
        """Same as sample()."""
        return self.sample(logits, states, num_generated, eos_token_id)

    def sample(
        self, logits: Tensor, states: list[SamplingState], num_generated: list[int],
        eos_token_id: int,
    ) -> SamplerOutput:
        """Pick one token per row of logits [B, V]; one host sync at the end."""
        assert logits.dim() == 2 and logits.shape[0] == len(states), (
            f"logits {tuple(logits.shape)} vs {len(states)} states")
        dev = logits.device
        params = [s.params for s in states]
        lp_rows = [r for r, p in enumerate(params) if p.logprobs is not None]
        raw_lp = None
        if lp_rows:
            # Reported logprobs come from the unmodified model distribution, as in vLLM.
            raw_lp = logits[_to_device(lp_rows, torch.long, dev)].float().log_softmax(dim=-1)

        x = apply_penalties(logits, states, num_generated, eos_token_id)  # [B, V] float32
        random_rows = [r for r, p in enumerate(params) if not p.greedy]
        if not random_rows:
            tokens = x.argmax(dim=-1)  # [B]
        else:
            # Greedy rows pay for an argmax only; the others for one draw each.
            all_random = len(random_rows) == len(params)
            rand_idx = None if all_random else _to_device(random_rows, torch.long, dev)
            xr = x if rand_idx is None else x[rand_idx]  # [R, V], ours to modify
            _temperature_and_filters_(xr, [params[r] for r in random_rows])
            sampled = _inverse_cdf_(xr, self._draw_uniform(states, random_rows, dev))  # [R]
            if rand_idx is None:
                tokens = sampled
            else:
                greedy_idx = _to_device([r for r, p in enumerate(params) if p.greedy], torch.long, dev)
                tokens = torch.empty(len(params), dtype=torch.long, device=dev)
                tokens[greedy_idx] = x[greedy_idx].argmax(dim=-1)
                tokens[rand_idx] = sampled

        out = SamplerOutput(token_ids=tokens.tolist())
        if raw_lp is not None:
            self._fill_logprobs(out, raw_lp, tokens, lp_rows, params)
        return out

    def _draw_uniform(self, states: list[SamplingState], random_rows: list[int], dev: torch.device) -> Tensor:
        """One U[0, 1) draw [R] per sampled row: seeded rows from their own generator, the rest in one call.

        A seeded row takes exactly one draw per step from its own stream, so its tokens do not depend on
        what else is in the batch.
        """
        u = torch.empty(len(random_rows), dtype=torch.float64, device=dev)
        seeded = [j for j, r in enumerate(random_rows) if states[r].generator is not None]
        unseeded = [j for j, r in enumerate(random_rows) if states[r].generator is None]
        if unseeded:
            draws = torch.rand(len(unseeded), dtype=torch.float64, device=dev,
                               generator=self._default_generator(dev))
            if len(unseeded) == len(random_rows):
                return draws
            u[_to_device(unseeded, torch.long, dev)] = draws
        for j in seeded:
            g = states[random_rows[j]].generator
            assert g is not None
            u[j] = torch.rand(1, dtype=torch.float64, device=g.device, generator=g).to(dev)[0]
        return u

    @staticmethod
    def _fill_logprobs(
        out: SamplerOutput, raw_lp: Tensor, tokens: Tensor, lp_rows: list[int],
        params: list[SamplingParams],
    ) -> None:
        dev = raw_lp.device
        chosen = raw_lp.gather(1, tokens[_to_device(lp_rows, torch.long, dev)][:, None])  # [R, 1]
        max_k = max(params[r].logprobs or 0 for r in lp_rows)
        top_v, top_i = raw_lp.topk(max_k, dim=-1)  # [R, max_k], sorted descending
        # tokens were already synced above, so these copies do not wait on the device.
        chosen_l, top_v_l, top_i_l = chosen[:, 0].tolist(), top_v.tolist(), top_i.tolist()
        out.logprobs = [None] * len(params)
        out.top_logprobs = [None] * len(params)
        for j, r in enumerate(lp_rows):
            k = params[r].logprobs or 0
            out.logprobs[r] = chosen_l[j]
            out.top_logprobs[r] = list(zip(top_i_l[j][:k], top_v_l[j][:k], strict=True))
