"""A simulated engine for the scheduler tests: its fake model checks every KV slot it reads; random workloads."""

import random

from server.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from server.engine.sequence import Sequence, SequenceStatus


def fake_token(tokens: list[int]) -> int:
    """A deterministic stand-in for sampling, so runs under different caches must agree."""
    return (sum(t * (i + 1) for i, t in enumerate(tokens[-8:])) + len(tokens)) % 1000


class SimEngine:
    """The engine loop with a fake model: KV of position p is the hash of tokens[: p + 1]."""

    def __init__(self, **config: object) -> None:
        self.config = SchedulerConfig(**config)  # type: ignore[arg-type]
        self.now = 0.0
        self.sched = Scheduler(self.config, clock=lambda: self.now)
        self.kv: dict[int, int] = {}
        self.outputs: list[SchedulerOutput] = []
        self.finished: list[Sequence] = []
        self.next_seq_id = 0

    def add(
        self,
        prompt: list[int],
        max_tokens: int,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> Sequence:
        self.now += 1.0
        arrival = self.now if arrival_time is None else arrival_time
        seq = Sequence(self.next_seq_id, request_id or f"r{self.next_seq_id}", prompt, max_tokens, arrival)
        self.next_seq_id += 1
        self.sched.add(seq)
        return seq

    def slot(self, seq: Sequence, pos: int) -> int:
        bs = self.config.block_size
        return seq.block_table[pos // bs] * bs + pos % bs

    def step(self) -> SchedulerOutput:
        out = self.sched.schedule()
        self.check_batch(out)
        self.run_model(out)
        self.sched.postprocess(out)
        for s in out.scheduled:
            seq = s.seq
            assert s.samples == (seq.num_computed_tokens == seq.num_tokens)
            if s.samples:
                seq.append_token(fake_token(seq.token_ids))
                if seq.num_generated_tokens >= seq.max_tokens:
                    self.sched.finish(seq)
                    self.finished.append(seq)
        self.sched.block_manager.check_invariants()
        self.outputs.append(out)
        return out

    def check_batch(self, out: SchedulerOutput) -> None:
        cfg = self.config
        assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled)
        assert out.num_batched_tokens <= cfg.max_num_batched_tokens
        assert len(out.scheduled) <= cfg.max_num_seqs
        assert self.sched.num_running <= cfg.max_num_seqs
        assert len({s.seq.seq_id for s in out.scheduled}) == len(out.scheduled)
        flags = [s.is_prefill for s in out.scheduled]
        assert flags == sorted(flags, reverse=True), "prefills must come before decodes"
        for s in out.scheduled:
            assert s.seq.status is SequenceStatus.RUNNING
            if not s.is_prefill:
                assert s.num_new_tokens == 1 and s.start_pos == s.seq.num_tokens - 1
        for seq in out.preempted:
            assert seq.status is SequenceStatus.WAITING and seq.block_table == []

    def run_model(self, out: SchedulerOutput) -> None:
        bm = self.sched.block_manager
        written: set[int] = set()
        for s in out.scheduled:
            seq, start = s.seq, s.start_pos
            assert start == seq.num_computed_tokens
            keys = [hash(tuple(seq.token_ids[: p + 1])) for p in range(start + s.num_new_tokens)]
            for p in range(start):  # attention reads: the cached context must be this prefix's KV
                assert self.kv.get(self.slot(seq, p)) == keys[p], f"{seq}: wrong KV at position {p}"
            for p in range(start, start + s.num_new_tokens):
                slot = self.slot(seq, p)
                assert slot not in written, f"slot {slot} written twice in one step"
                block_id = seq.block_table[p // self.config.block_size]
                assert bm.ref_count(block_id) == 1, f"write to shared block {block_id}"
                written.add(slot)
                self.kv[slot] = keys[p]

    def run(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                return
            self.step()
        raise AssertionError("did not finish: livelock")

    def assert_all_free(self) -> None:
        bm = self.sched.block_manager
        assert bm.num_free_blocks == bm.num_total_blocks and bm.usage == 0.0


def random_workload(seed: int, num_seqs: int, max_prompt: int, max_gen: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(1000) for _ in range(max_prompt)]
    work = []
    for _ in range(num_seqs):
        n = rng.randint(1, max_prompt)
        # Half the prompts share a prefix, so prefix caching and preemption interact.
        prompt = shared[: n // 2] + [rng.randrange(1000) for _ in range(n - n // 2)]
        work.append((prompt, rng.randint(1, max_gen)))
    return work


def run_workload(work: list[tuple[list[int], int]], **config: object) -> SimEngine:
    eng = SimEngine(**config)
    for prompt, max_tokens in work:
        eng.add(prompt, max_tokens)
    eng.run()
    return eng
