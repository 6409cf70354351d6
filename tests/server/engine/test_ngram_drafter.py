"""The prompt-lookup drafter and --speculative-config parsing."""

import pytest

from server.engine.ngram_drafter import NgramDrafter, NgramIndex
from server.engine.sequence import Sequence
from server.engine.speculative_config import SpeculativeConfig


def test_latest_occurrence_of_the_longest_n_gram_is_continued() -> None:
    index = NgramIndex(1, 3)
    tokens = [1, 2, 3, 9, 1, 2, 3, 8, 5, 2, 3]
    # [2, 3] last ended at position 7 (followed by 8, 5, 2); the 3-gram [5, 2, 3] never appeared before.
    assert index.propose(tokens, 3) == [8, 5, 2]
    tokens += [8]
    assert index.propose(tokens, 2) == [5, 2]  # [2, 3, 8] seen once: continues with 5, 2 (indexed incrementally)
    assert NgramIndex(2, 3).propose([4, 5, 6, 7], 3) == []  # no earlier occurrence; the suffix never matches itself


def test_a_match_that_runs_into_the_present_repeats_with_its_period() -> None:
    assert NgramIndex(1, 2).propose([9, 7, 7], 4) == [7, 7, 7, 7]
    assert NgramIndex(2, 2).propose([1, 4, 5, 4, 5], 5) == [4, 5, 4, 5, 4]


def test_drafts_respect_max_tokens_prefill_and_the_batch_size_limit() -> None:
    config = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_min=1, prompt_lookup_max=2,
                               disable_by_batch_size=3)
    drafter = NgramDrafter(config, max_model_len=64)
    seqs = [Sequence(i, f"r{i}", [5, 6, 5, 6, 5], max_tokens=m, arrival_time=0.0) for i, m in enumerate((10, 3))]
    for seq in seqs:
        seq.token_ids.append(6)  # one generated token, the last one missing its KV: decoding
        seq.num_computed_tokens = seq.num_tokens - 1
    drafter.propose(seqs)
    assert seqs[0].spec_token_ids == [5, 6, 5, 6] and seqs[1].spec_token_ids == [5]  # 3 - 1 generated - 1
    prefill = Sequence(2, "r2", [5, 6, 5, 6], max_tokens=10, arrival_time=0.0)
    drafter.propose([*seqs, prefill])  # three running: at disable_by_batch_size, nobody drafts
    assert [s.spec_token_ids for s in (*seqs, prefill)] == [[], [], []]


def test_config_reads_vllms_json_and_names_what_is_wrong() -> None:
    config = SpeculativeConfig.from_json('{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}')
    assert (config.prompt_lookup_min, config.prompt_lookup_max, config.disable_by_batch_size) == (3, 3, None)
    assert SpeculativeConfig.from_json('{"method": "ngram", "num_speculative_tokens": 2}').prompt_lookup_min == 5
    for text, message in (('{"method": "eagle", "num_speculative_tokens": 2}', "method 'eagle' is not supported"),
                          ('{"method": "ngram"}', "num_speculative_tokens"),
                          ('{"method": "ngram", "num_speculative_tokens": 2, "model": "x"}', "key(s) model"),
                          ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens must be"),
                          ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, '
                           '"prompt_lookup_max": 2}', "prompt_lookup_min (4) must be <="),
                          ("ngram", "not valid JSON")):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            SpeculativeConfig.from_json(text)
