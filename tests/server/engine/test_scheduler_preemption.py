"""Scheduler preemption on the simulated engine: who is preempted, requeued first, and a tiny cache's run equal to a
large cache's."""

import pytest

from tests.server.engine.scheduler_sim import SimEngine, random_workload, run_workload


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
