"""Scheduler: driven by a simulated engine whose fake model checks every KV slot it reads."""

import random

import pytest

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


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_batched_tokens": -1}, "max_num_batched_tokens"),
        ({"block_size": 0}, "block_size"),
        ({"num_blocks": 0}, "num_blocks"),
        ({"num_blocks": 10, "max_model_len": 2048}, "max_model_len"),
        ({"enable_prefix_caching": 1}, "enable_prefix_caching"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**{"num_blocks": 1000, **kwargs})  # type: ignore[arg-type]


def test_add_rejects_a_sequence_longer_than_max_model_len() -> None:
    sched = Scheduler(SchedulerConfig(num_blocks=8, block_size=4, max_model_len=32))
    with pytest.raises(AssertionError, match="max_model_len"):
        sched.add(Sequence(0, "r", list(range(30)), max_tokens=3, arrival_time=0.0))


# -- batching limits --------------------------------------------------------------------------


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_budget_and_max_num_seqs_are_respected(prefix_caching: bool) -> None:
    work = random_workload(seed=1, num_seqs=40, max_prompt=100, max_gen=20)
    eng = run_workload(
        work,
        max_num_seqs=6,
        max_num_batched_tokens=64,
        max_model_len=128,
        block_size=8,
        num_blocks=200,
        enable_prefix_caching=prefix_caching,
    )
    assert max(o.num_batched_tokens for o in eng.outputs) == 64  # the budget was the binding limit
    assert max(len(o.scheduled) for o in eng.outputs) == 6
    assert all(s.num_generated_tokens == s.max_tokens for s in eng.finished)
    assert len(eng.finished) == 40
    eng.assert_all_free()


def test_more_running_decodes_than_budget_take_turns() -> None:
    eng = SimEngine(max_num_seqs=8, max_num_batched_tokens=4, max_model_len=32, block_size=4, num_blocks=64)
    seqs = [eng.add([i, i + 1], max_tokens=6) for i in range(8)]
    eng.run()
    assert all(o.num_batched_tokens <= 4 for o in eng.outputs)
    assert max(len(o.scheduled) for o in eng.outputs) == 4
    assert all(s.num_generated_tokens == 6 for s in seqs)
    eng.assert_all_free()


def test_long_prompt_is_chunked_while_decodes_progress_every_step() -> None:
    eng = SimEngine(max_num_batched_tokens=512, max_model_len=2048, num_blocks=400)
    decoders = [eng.add(list(range(i, i + 10)), max_tokens=100) for i in range(8)]
    eng.step()  # the 8 prompts
    long_seq = eng.add(list(range(1500)), max_tokens=5)
    chunks = []
    while long_seq.num_generated_tokens == 0:
        before = [d.num_generated_tokens for d in decoders]
        out = eng.step()
        assert [d.num_generated_tokens for d in decoders] == [b + 1 for b in before]
        assert out.num_batched_tokens <= 512
        chunks += [s.num_new_tokens for s in out.scheduled if s.seq is long_seq]
        assert out.scheduled[0].seq is long_seq and out.scheduled[0].is_prefill
    assert chunks == [504, 504, 492]
    eng.run()
    eng.assert_all_free()


def test_decodes_are_not_starved_by_an_earlier_arrived_long_prefill() -> None:
    # Arrival stamps need not follow add() order (e.g. a long prompt tokenized slowly), so a
    # prefill can sit ahead of a decode in the arrival-ordered running list.
    eng = SimEngine(max_num_batched_tokens=64, max_model_len=1024, num_blocks=200)
    short = eng.add([1, 2, 3], max_tokens=50, arrival_time=10.0)
    eng.step()
    long_seq = eng.add(list(range(600)), max_tokens=2, arrival_time=5.0)
    eng.step()
    assert eng.sched.running == [long_seq, short]
    while long_seq.num_generated_tokens == 0:
        before = short.num_generated_tokens
        out = eng.step()
        assert short.num_generated_tokens == before + 1
        assert [s.num_new_tokens for s in out.scheduled if s.seq is long_seq] in ([63], [600 - 63 * 9])
    eng.run()
    eng.assert_all_free()


# -- admission --------------------------------------------------------------------------------


def test_admission_is_fcfs() -> None:
    eng = SimEngine(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64, block_size=4, num_blocks=64)
    seqs = [eng.add([i] * (5 + 7 * (i % 3)), max_tokens=3) for i in range(7)]
    eng.run()
    admission = sorted(seqs, key=lambda s: (s.first_scheduled_time, s.seq_id))
    assert [s.seq_id for s in admission] == list(range(7))
    assert [s.first_scheduled_time for s in seqs] == sorted(s.first_scheduled_time for s in seqs)


def test_a_head_that_does_not_fit_blocks_the_queue() -> None:
    eng = SimEngine(max_num_batched_tokens=64, max_model_len=32, block_size=4, num_blocks=10)
    holder = eng.add(list(range(20)), max_tokens=10)  # 5 blocks at admission
    eng.step()
    big = eng.add(list(range(100, 124)), max_tokens=1)  # needs 6 blocks, only 5 free
    small = eng.add([7, 8], max_tokens=1)  # would fit, must not jump ahead
    eng.step()
    assert big.status is SequenceStatus.WAITING and small.status is SequenceStatus.WAITING
    assert list(eng.sched.waiting) == [big, small]
    eng.run()
    assert eng.finished.index(holder) < eng.finished.index(big) < eng.finished.index(small)
    eng.assert_all_free()


# -- preemption -------------------------------------------------------------------------------


def test_preemption_takes_the_latest_arrival_and_requeues_it_first() -> None:
    eng = SimEngine(max_num_seqs=2, max_num_batched_tokens=16, max_model_len=16, block_size=4, num_blocks=4)
    first = eng.add([1, 2, 3, 4], max_tokens=12)
    second = eng.add([5, 6, 7, 8], max_tokens=12)
    third = eng.add([9], max_tokens=1)  # waits for a seat (max_num_seqs=2)
    while not eng.outputs or not eng.outputs[-1].preempted:
        eng.step()
    out = eng.outputs[-1]
    assert out.preempted == [second]
    assert list(eng.sched.waiting) == [second, third] and second.num_preemptions == 1
    assert second.num_computed_tokens == 0 and second.num_generated_tokens > 0
    assert [s.seq for s in out.scheduled] == [first]
    generated = second.generated_token_ids
    eng.run()
    assert second.generated_token_ids[: len(generated)] == generated
    assert eng.sched.num_preemptions >= 1
    eng.assert_all_free()


def test_a_sequence_that_is_itself_the_latest_preempts_itself() -> None:
    eng = SimEngine(max_num_batched_tokens=16, max_model_len=16, block_size=4, num_blocks=4)
    early = eng.add([1, 2, 3, 4, 5, 6, 7], max_tokens=8)  # 2 blocks, its 9th token needs a 3rd
    late = eng.add([9, 9, 9, 9, 9], max_tokens=8)  # 2 blocks
    eng.step()
    eng.step()  # early's decode takes the last free block
    out = eng.step()  # late's decode needs a block: late is the latest, so it goes
    assert out.preempted == [late] and [s.seq for s in out.scheduled] == [early]
    eng.run()
    assert early.num_preemptions == 0 and late.num_preemptions >= 1
    eng.assert_all_free()


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_cache_preempts_but_matches_a_large_cache_run(prefix_caching: bool, seed: int) -> None:
    work = random_workload(seed=seed, num_seqs=24, max_prompt=40, max_gen=24)
    common = {"max_num_batched_tokens": 48, "max_model_len": 64, "block_size": 4}
    tiny = run_workload(work, num_blocks=16, enable_prefix_caching=prefix_caching, **common)
    large = run_workload(work, num_blocks=1000, enable_prefix_caching=prefix_caching, **common)
    assert tiny.sched.num_preemptions > 0 and large.sched.num_preemptions == 0
    tokens = {s.seq_id: s.token_ids for s in tiny.finished}
    assert tokens == {s.seq_id: s.token_ids for s in large.finished}
    assert all(len(tokens[i]) == len(work[i][0]) + work[i][1] for i in range(len(work)))
    tiny.assert_all_free()
    large.assert_all_free()


# -- prefix caching ---------------------------------------------------------------------------


def test_shared_prefix_is_reused_and_only_the_rest_scheduled() -> None:
    eng = SimEngine(max_num_batched_tokens=256, max_model_len=256, num_blocks=64)
    prefix = list(range(300, 364))
    eng.add([*prefix, 1, 2, 3, 4, 5, 6, 7, 8], max_tokens=2)
    eng.run()
    second = eng.add([*prefix, 9, 9, 9], max_tokens=2)
    out = eng.step()
    assert second.num_cached_tokens == 64
    assert [(s.start_pos, s.num_new_tokens) for s in out.scheduled] == [(64, 3)]
    assert eng.sched.num_prefix_hit_tokens == 64
    assert eng.sched.num_prefix_queries_tokens == 72 + 67
    eng.run()
    eng.assert_all_free()


def test_full_prompt_match_still_computes_the_last_token() -> None:
    eng = SimEngine(max_num_batched_tokens=256, max_model_len=256, num_blocks=64)
    prompt = list(range(64))
    first = eng.add(prompt, max_tokens=1)
    eng.run()
    again = eng.add(prompt, max_tokens=1)
    out = eng.step()
    assert again.num_cached_tokens == 48
    assert [(s.start_pos, s.num_new_tokens, s.samples) for s in out.scheduled] == [(48, 16, True)]
    assert again.token_ids == first.token_ids  # same sampled token from the reused KV
    eng.assert_all_free()


def test_identical_prompts_share_blocks_while_running() -> None:
    eng = SimEngine(max_num_batched_tokens=256, max_model_len=256, num_blocks=64)
    prompt = list(range(49))
    eng.add(prompt, max_tokens=20)
    eng.step()
    twins = [eng.add(prompt, max_tokens=20) for _ in range(4)]
    eng.step()
    bm = eng.sched.block_manager
    shared = eng.sched.running[0].block_table[:3]
    assert all(t.num_cached_tokens == 48 and t.block_table[:3] == shared for t in twins)
    assert [bm.ref_count(b) for b in shared] == [5, 5, 5]
    eng.run()
    assert len({tuple(s.token_ids) for s in eng.finished}) == 1
    eng.assert_all_free()


# -- abort --------------------------------------------------------------------------------------


def test_abort_mid_prefill_mid_decode_and_waiting_frees_everything() -> None:
    eng = SimEngine(max_num_seqs=3, max_num_batched_tokens=128, max_model_len=1024, num_blocks=128)
    decoding = eng.add([1, 2, 3], max_tokens=50)
    eng.step()
    prefilling = eng.add(list(range(900)), max_tokens=5)
    eng.step()
    queued = [eng.add([4, 5], max_tokens=5, request_id="n2") for _ in range(2)]  # one request, n=2
    running_twin = eng.add([6], max_tokens=50, request_id="twin")
    eng.step()
    assert prefilling.is_prefill and prefilling.num_computed_tokens > 0
    assert not decoding.is_prefill and decoding.num_generated_tokens > 0
    assert eng.sched.abort(prefilling.request_id) == [prefilling]
    assert eng.sched.abort(decoding.request_id) == [decoding]
    assert eng.sched.abort("n2") == queued and eng.sched.abort("n2") == []
    assert all(s.status is SequenceStatus.FINISHED and s.block_table == [] for s in [prefilling, *queued])
    assert eng.sched.running == [running_twin] or running_twin in eng.sched.waiting
    eng.sched.abort("twin")
    assert not eng.sched.has_unfinished()
    eng.sched.block_manager.check_invariants()
    eng.assert_all_free()


def test_abort_between_schedule_and_postprocess_is_harmless() -> None:
    eng = SimEngine(max_num_batched_tokens=64, max_model_len=256, num_blocks=64)
    seq = eng.add(list(range(100)), max_tokens=5)
    out = eng.sched.schedule()
    eng.sched.abort(seq.request_id)
    eng.sched.postprocess(out)
    assert seq.num_computed_tokens == 0
    eng.assert_all_free()


def test_finish_requires_a_running_sequence() -> None:
    eng = SimEngine(num_blocks=200)
    seq = eng.add([1, 2], max_tokens=1)
    with pytest.raises(AssertionError, match="non-running"):
        eng.sched.finish(seq)


def test_first_scheduled_time_uses_the_clock_and_survives_preemption() -> None:
    eng = SimEngine(max_num_batched_tokens=16, max_model_len=16, block_size=4, num_blocks=4)
    first = eng.add([1, 2, 3, 4], max_tokens=12)
    second = eng.add([5, 6, 7, 8], max_tokens=12)
    eng.now = 42.0
    eng.step()
    eng.now = 99.0
    eng.run()
    assert second.num_preemptions >= 1
    assert first.first_scheduled_time == second.first_scheduled_time == 42.0
