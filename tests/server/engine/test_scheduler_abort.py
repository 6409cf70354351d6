"""Scheduler abort and finish on the simulated engine: aborts anywhere free everything; finish needs a running
sequence."""

import pytest

from server.engine.sequence import SequenceStatus
from tests.server.engine.scheduler_sim import SimEngine


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
