"""The batched sampler: one token per row of logits [B, V] (B rows being sampled, V vocabulary size).

Raw logprobs -> the logits processors (server/engine/logits_processors.py) -> the grammar bitmask of the
constrained rows (server/engine/grammar.py) -> greedy argmax, or an exponential race (Gumbel-max: one Exp(1)
draw per token of the row).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from server.engine.grammar import BitmaskFiller, apply_bitmask_
from server.engine.logits_processors import apply_penalties, temperature_and_filters_, to_device
from server.engine.sampler_state import SamplingState
from server.engine.sampling_params import SamplingParams


def exponential_race_(logits: Tensor, noise: Tensor) -> Tensor:
    """Token ids [R], one drawn per row of softmax(logits) [R, V], given noise [R, V] of Exp(1) draws: the
    argmax of p_i / E_i, i.e. of logits_i - log(E_i). In place over logits and noise.

    NOTE: why not an inverse-CDF walk (one uniform per row): the cumulative sum over V ~ 49k tokens moves every
    boundary by the last-bit noise of the logits, and the lm_head / MoE kernels give the same sequence
    logits that differ by ~1e-6..2e-5 between batch 1 and batch 2+ or a prefix-cache hit; the walk then lands
    on another token whenever u falls within that noise of any boundary (measured: 2 of 24 seeded 120-token
    requests changed beside others). The race changes its winner only when the two best perturbed scores are
    within that noise of each other: a true near-tie, so replays match far more often (README, "Seeds").
    """
    return logits.sub_(noise.log_()).argmax(dim=-1)  # -inf (filtered) tokens stay -inf


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
        self._bitmasks: BitmaskFiller | None = None  # made on the first constrained row

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
            raw_lp = logits[to_device(lp_rows, torch.long, dev)].float().log_softmax(dim=-1)

        x = apply_penalties(logits, states, num_generated, eos_token_id)  # [B, V] float32
        self.apply_grammars(x, states)
        random_rows = [r for r, p in enumerate(params) if not p.greedy]
        if not random_rows:
            tokens = x.argmax(dim=-1)  # [B]
        else:
            # Greedy rows pay for an argmax only; the others for one draw each.
            all_random = len(random_rows) == len(params)
            rand_idx = None if all_random else to_device(random_rows, torch.long, dev)
            xr = x if rand_idx is None else x[rand_idx]  # [R, V], ours to modify
            temperature_and_filters_(xr, [params[r] for r in random_rows])
            sampled = exponential_race_(xr, self.draw_noise(states, random_rows, xr))  # [R]
            if rand_idx is None:
                tokens = sampled
            else:
                greedy_idx = to_device([r for r, p in enumerate(params) if p.greedy], torch.long, dev)
                tokens = torch.empty(len(params), dtype=torch.long, device=dev)
                tokens[greedy_idx] = x[greedy_idx].argmax(dim=-1)
                tokens[rand_idx] = sampled

        out = SamplerOutput(token_ids=tokens.tolist())
        if raw_lp is not None:
            self.fill_logprobs(out, raw_lp, tokens, lp_rows, params)
        return out

    def apply_grammars(self, x: Tensor, states: list[SamplingState]) -> None:
        """Mask the disallowed tokens of the constrained rows of x [B, V]; the other rows are not touched."""
        rows = [r for r, s in enumerate(states) if s.matcher is not None]
        if not rows:
            return
        if self._bitmasks is None:
            self._bitmasks = BitmaskFiller()
        bitmask = self._bitmasks.fill([states[r].matcher for r in rows], x.shape[1])  # type: ignore[misc]
        if len(rows) == len(states):
            apply_bitmask_(x, bitmask)
            return
        idx = to_device(rows, torch.long, x.device)
        sub = x[idx]  # [C, V]
        apply_bitmask_(sub, bitmask)
        x[idx] = sub

    def draw_noise(self, states: list[SamplingState], random_rows: list[int], like: Tensor) -> Tensor:
        """Exp(1) noise [R, V] for the sampled rows: seeded rows from their own generator, the rest in one call.

        A seeded row takes exactly V draws per step from its own stream, so its tokens do not depend on what
        else is in the batch.
        """
        noise = torch.empty(like.shape, dtype=torch.float32, device=like.device)  # [R, V]
        seeded = [j for j, r in enumerate(random_rows) if states[r].generator is not None]
        unseeded = [j for j, r in enumerate(random_rows) if states[r].generator is None]
        dev = like.device
        if unseeded:
            if len(unseeded) == len(random_rows):
                return noise.exponential_(generator=self._default_generator(dev))
            draws = torch.empty(len(unseeded), like.shape[1], dtype=torch.float32, device=dev)
            noise[to_device(unseeded, torch.long, dev)] = draws.exponential_(generator=self._default_generator(dev))
        for j in seeded:
            g = states[random_rows[j]].generator
            assert g is not None
            if g.device == noise.device:
                noise[j].exponential_(generator=g)
            else:
                noise[j] = torch.empty(like.shape[1], device=g.device).exponential_(generator=g).to(dev)
        return noise

    @staticmethod
    def fill_logprobs(
        out: SamplerOutput, raw_lp: Tensor, tokens: Tensor, lp_rows: list[int],
        params: list[SamplingParams],
    ) -> None:
        dev = raw_lp.device
        chosen = raw_lp.gather(1, tokens[to_device(lp_rows, torch.long, dev)][:, None])  # [R, 1]
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
