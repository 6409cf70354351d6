"""Scheduler configuration, batch limits (token budget, max_num_seqs, chunked prefill beside decodes) and FCFS
admission, on the simulated engine."""

import pytest

from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.sequence import Sequence, SequenceStatus
from tests.server.engine.scheduler_sim import SimEngine, random_workload, run_workload

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
