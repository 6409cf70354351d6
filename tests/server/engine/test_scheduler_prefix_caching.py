"""Scheduler prefix caching on the simulated engine: shared prefixes reused, only the rest scheduled, blocks shared."""

from tests.server.engine.scheduler_sim import SimEngine


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
