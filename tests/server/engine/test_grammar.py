"""The grammar backend (server/engine/grammar.py) and its use in the batched sampler: masks match a bit-by-bit
reference, constrained rows only draw allowed tokens, unconstrained rows are untouched, compilation is cached and
time-limited."""

import asyncio

import pytest
import torch

from server.engine.grammar import (
    BitmaskFiller,
    GrammarCompiler,
    GrammarError,
    GrammarSpec,
    apply_bitmask_,
)
from server.engine.sampler import Sampler
from server.engine.sampler_state import SamplingState
from server.engine.sampling_params import SamplingParams
from server.openai.protocol import GrammarRequest
from server.tokenizer import Tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def compiler(tok: Tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tok.to_json(), tok.vocab_size, tok.eos_token_id)


def allowed_set(bitmask_row: torch.Tensor, vocab: int) -> set[int]:
    """The straightforward reading of one mask row: token t is allowed when bit t % 32 of word t // 32 is set."""
    words = bitmask_row.tolist()
    return {t for t in range(vocab) if (words[t // 32] >> (t % 32)) & 1}


@pytest.mark.parametrize("vocab", [32, 70, 1000])
def test_apply_bitmask_matches_the_bitwise_reference(vocab: int) -> None:
    g = torch.Generator().manual_seed(vocab)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, words), generator=g, dtype=torch.int64).to(torch.int32)
    logits = torch.randn(3, vocab, generator=g)
    masked = logits.clone()
    apply_bitmask_(masked, bitmask)
    for r in range(3):
        keep = allowed_set(bitmask[r], vocab)
        for t in range(vocab):
            assert masked[r, t].item() == (logits[r, t].item() if t in keep else -float("inf"))


def test_choice_mask_allows_exactly_the_continuations(compiler: GrammarCompiler, tok: Tokenizer) -> None:
    matcher = compiler.compile(GrammarSpec("choice", '["yes", "no"]'), "f").new_matcher()
    bitmask = BitmaskFiller().fill([matcher], tok.vocab_size)
    allowed = allowed_set(bitmask[0], tok.vocab_size)
    texts = {tok.decode([t]) for t in allowed}
    assert {"yes", "no"} <= texts and all("yes".startswith(t) or "no".startswith(t) for t in texts), texts
    assert matcher.consume_tokens(tok.encode("yes"))
    done = allowed_set(BitmaskFiller().fill([matcher], tok.vocab_size)[0], tok.vocab_size)
    assert done == {tok.eos_token_id}  # complete: only EOS


def test_sampler_constrains_only_the_constrained_rows(compiler: GrammarCompiler, tok: Tokenizer) -> None:
    vocab = tok.vocab_size
    grammar = compiler.compile(GrammarSpec("regex", "[0-9]+"), "f")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, vocab, generator=g)
    greedy, seeded = SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=42)

    def rows(with_grammar: bool) -> list[SamplingState]:
        matcher = grammar.new_matcher if with_grammar else (lambda: None)
        return [SamplingState(greedy), SamplingState(seeded, matcher=matcher()),
                SamplingState(seeded), SamplingState(greedy, matcher=matcher())]

    plain = Sampler(seed=0).sample(logits.clone(), rows(False), [0] * 4, tok.eos_token_id).token_ids
    mixed = Sampler(seed=0).sample(logits.clone(), rows(True), [0] * 4, tok.eos_token_id).token_ids
    assert (mixed[0], mixed[2]) == (plain[0], plain[2])  # unconstrained rows: the same tokens
    for r in (1, 3):
        assert tok.decode([mixed[r]]).isdigit(), tok.decode([mixed[r]])
    assert plain[3] == logits[3].argmax().item() and not tok.decode([plain[3]]).isdigit()  # the mask mattered


def test_min_tokens_does_not_ban_eos_on_a_constrained_row(compiler: GrammarCompiler, tok: Tokenizer) -> None:
    matcher = compiler.compile(GrammarSpec("choice", '["a"]'), "f").new_matcher()
    assert matcher.consume_tokens(tok.encode("a"))
    state = SamplingState(SamplingParams(temperature=0.0, min_tokens=5), matcher=matcher)
    out = Sampler().sample(torch.zeros(1, tok.vocab_size), [state], [1], tok.eos_token_id)
    assert out.token_ids == [tok.eos_token_id]


def test_compile_is_cached_and_errors_name_the_field(compiler: GrammarCompiler) -> None:
    spec = GrammarSpec("json", '{"type": "integer"}')
    assert compiler.compile(spec, "a") is compiler.compile(spec, "b")
    for bad in (GrammarSpec("json", '{"type": "frob"}'), GrammarSpec("regex", "(("), GrammarSpec("grammar", "x")):
        with pytest.raises(GrammarError) as info:
            compiler.compile(bad, "response_format")
        assert info.value.field == "response_format" and "response_format" in str(info.value)


def test_compile_time_limit(tok: Tokenizer) -> None:
    slow = GrammarCompiler(tok.to_json(), tok.vocab_size, tok.eos_token_id, timeout_s=0.0)
    with pytest.raises(GrammarError, match="took longer"):
        asyncio.run(slow.compile_async(GrammarSpec("regex", "[a-z]+"), "structured_outputs.regex"))


def test_json_schema_keys_come_in_the_schema_order(compiler: GrammarCompiler, tok: Tokenizer) -> None:
    # OpenAI's Structured Outputs write keys in schema order ("reasoning" before "answer" schemas rely on it).
    schema = {"type": "object", "properties": {"zebra": {"type": "boolean"}, "apple": {"type": "boolean"}},
              "required": ["zebra", "apple"], "additionalProperties": False}
    request = GrammarRequest.json_schema(schema, "structured_outputs.json")
    grammar = compiler.compile(GrammarSpec(request.kind, request.source), request.field)
    assert grammar.new_matcher().consume_tokens(tok.encode('{"zebra":true,"apple":false}'))
    assert not grammar.new_matcher().consume_tokens(tok.encode('{"apple":false,"zebra":true}'))
