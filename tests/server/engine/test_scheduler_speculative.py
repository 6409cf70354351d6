"""The scheduler and block manager under speculative drafts: a long randomized run of the simulated engine whose
fake model checks every KV slot it reads; drafts are right or wrong at random, so blocks see rejections, prefix
hits and preemptions, and the block manager's invariants are checked after every step."""

import random

from server.engine.outputs import SampledToken
from server.engine.scheduler import SchedulerOutput
from tests.server.engine.scheduler_sim import SimEngine, fake_token, random_workload


class SpecSimEngine(SimEngine):
    """Decodes carry up to k random drafts, each the fake model's own token with probability 0.6. The KV written for
    a drafted position is the hash of the tokens with the drafts, so a rejected draft's KV is wrong for the sequence
    and a read of it (or a published block holding it) fails the check."""

    def __init__(self, rng: random.Random, k: int, **config: object) -> None:
        super().__init__(**config)
        self.rng, self.k = rng, k
        self.num_kept = 0

    def draft(self, tokens: list[int], room: int) -> list[int]:
        drafts: list[int] = []
        for _ in range(min(self.rng.randint(0, self.k), room)):
            right = fake_token(tokens + drafts)
            drafts.append(right if self.rng.random() < 0.6 else (right + 1) % 1000)
        return drafts

    def step(self) -> SchedulerOutput:
        sched = self.sched
        for seq in sched.running:
            room = seq.max_tokens - seq.num_generated_tokens - 1
            seq.spec_token_ids = [] if seq.is_prefill else self.draft(seq.token_ids, room)
        out = sched.schedule()
        assert out.num_batched_tokens <= self.config.max_num_batched_tokens
        self.run_spec_model(out)
        sampled = []
        for s in out.scheduled:
            if not s.samples:
                continue
            tokens = list(s.seq.token_ids)
            kept = 0
            while kept < len(s.draft_token_ids) and s.draft_token_ids[kept] == fake_token(tokens):
                tokens.append(s.draft_token_ids[kept])
                kept += 1
            self.num_kept += kept
            sampled.append(SampledToken(s.seq, [*s.draft_token_ids[:kept], fake_token(tokens)], None, None))
        for update in sched.update_from_output(out, sampled, eos_token_id=-1):
            if update.finish_reason is not None:
                self.finished.append(update.seq)
        bm = sched.block_manager
        bm.check_invariants()
        for seq in sched.running:
            # No block of a running sequence lies past its tokens: rejected drafts' blocks went back.
            assert len(seq.block_table) <= bm.num_blocks_for(seq.num_tokens), seq
            assert seq.num_computed_tokens < seq.num_tokens, seq  # kept drafts' KV counts, rejected drafts' not
        self.outputs.append(out)
        return out

    def run_spec_model(self, out: SchedulerOutput) -> None:
        bm = self.sched.block_manager
        written: set[int] = set()
        for s in out.scheduled:
            seq, start = s.seq, s.start_pos
            assert start == seq.num_computed_tokens
            assert not s.draft_token_ids or not s.is_prefill
            tokens = seq.token_ids[:start + s.num_new_tokens - len(s.draft_token_ids)] + s.draft_token_ids
            keys = [hash(tuple(tokens[: p + 1])) for p in range(len(tokens))]
            for p in range(start):  # the cached context must be this sequence's own KV
                assert self.kv.get(self.slot(seq, p)) == keys[p], f"{seq}: wrong KV at position {p}"
            for p in range(start, start + s.num_new_tokens):
                slot = self.slot(seq, p)
                assert slot not in written, f"slot {slot} written twice in one step"
                assert bm.ref_count(seq.block_table[p // self.config.block_size]) == 1, "write to a shared block"
                written.add(slot)
                self.kv[slot] = keys[p]


def test_randomized_run_with_drafts_keeps_the_cache_consistent() -> None:
    rng = random.Random(7)
    work = random_workload(seed=11, num_seqs=40, max_prompt=24, max_gen=40)
    work += work[:8]  # repeated prompts: prefix hits on blocks that held drafts
    # 24 blocks of 4 tokens for 40+ sequences of up to 64 tokens: preemptions throughout.
    eng = SpecSimEngine(rng, k=4, max_num_seqs=8, max_num_batched_tokens=24, max_model_len=64, block_size=4,
                        num_blocks=24)
    for prompt, max_tokens in work:
        eng.add(prompt, max_tokens)
    eng.run(max_steps=600)
    eng.assert_all_free()
    assert len(eng.finished) == len(work) and eng.num_kept > 100
    assert eng.sched.num_preemptions > 0 and eng.sched.block_manager.num_prefix_hit_tokens > 0
    assert 100 <= len(eng.outputs) <= 600
    for seq in eng.finished:  # every token is the fake model's own, as without drafts
        assert seq.num_generated_tokens == seq.max_tokens
        for p in range(seq.num_prompt_tokens, seq.num_tokens):
            assert seq.token_ids[p] == fake_token(seq.token_ids[:p]), (seq, p)
