"""IncrementalDetokenizer of server/tokenizer.py: streamed deltas add up to the decoded text, partial characters
held back, a small decode window."""

import random

import pytest

from server.tokenizer import IncrementalDetokenizer, Tokenizer

FFFD = "\ufffd"

TEXTS = [
    "Hello, world!",
    "héllo wörld ça va? Ñandú",
    "日本語のテキストです。中文也可以。한국어 텍스트",
    "emoji 🙂🚀 flags 🇫🇷🇯🇵 family 👨‍👩‍👧‍👦 skin 👍🏽",
    "combining: e\u0301 a\u0308 n\u0303 Z\u0351\u0337\u0332a\u0360lgo",
    "math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√ and replacement \ufffd char in the middle",
    "code:\n\tdef f(x):\n\t\treturn x ** 2  # ✓\n",
    "ends with emoji 🎉",
    "🎉",
    "",
]


def stream(tok: Tokenizer, ids: list[int], prompt: list[int] | None = None, skip: bool = True) -> list[str]:
    """All deltas of a detokenizer fed ids one by one, the flush last."""
    detok = IncrementalDetokenizer(tok, prompt or [], skip_special_tokens=skip)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert detok.output_len == sum(map(len, deltas))
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_reproduces_clean_text(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    deltas = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == text
    if FFFD not in text:
        assert not any(FFFD in d for d in deltas)


@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_with_prompt_context(tok: Tokenizer, text: str) -> None:
    prompt = tok.encode("Some prompt: 日本")
    ids = tok.encode(text)
    assert "".join(stream(tok, ids, prompt)) == text


def test_detokenizer_prompt_ending_mid_character(tok: Tokenizer) -> None:
    # A token-id prompt may end inside a character; the output is still the text of the
    # generated ids alone, never glued to the prompt's dangling bytes.
    head, *tail = tok.encode("日")
    for ids in (tok.encode("本 ok"), [*tail, *tok.encode(" ok")]):
        assert "".join(stream(tok, ids, [42, head])) == tok.decode(ids)
    assert tok.decode([*tail, *tok.encode(" ok")]).startswith(FFFD)


def test_detokenizer_characters_without_tokens(tok: Tokenizer) -> None:
    # U+40000 is F1 80 80 80 in UTF-8; F1 has no token, so the encoding keeps stray continuation bytes.
    text = "a\x04b \U00040000 c \U0005ffff d"
    ids = tok.encode(text)
    assert "".join(stream(tok, ids)) == tok.decode(ids)


@pytest.mark.parametrize("skip", [True, False])
def test_detokenizer_random_ids(tok: Tokenizer, skip: bool) -> None:
    rng = random.Random(1234)
    # Bias towards tokens that hold partial characters and towards special tokens.
    partial = [i for i in range(tok.vocab_size) if FFFD in tok.token_text(i)]
    for _ in range(300):
        length = rng.randint(1, 40)
        pools = [partial] * 5 + [range(17)] + [range(tok.vocab_size)] * 4
        ids = [rng.choice(rng.choice(pools)) for _ in range(length)]
        prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 6))]
        deltas = stream(tok, ids, prompt, skip)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip), ids
        # Only the flush may end in U+FFFD: a held-back partial character is final only then.
        assert not any(d.endswith(FFFD) for d in deltas[:-1]), ids


def test_detokenizer_window_stays_small(tok: Tokenizer) -> None:
    longest: list[int] = [0]

    class Spy(Tokenizer):
        def decode(self, ids, skip_special_tokens=True):  # type: ignore[no-untyped-def]
            longest[0] = max(longest[0], len(ids))
            return super().decode(ids, skip_special_tokens)

    spy = Spy.__new__(Spy)
    spy.__dict__.update(tok.__dict__)
    ids = tok.encode("日本語 and text 🙂 " * 200)
    assert "".join(stream(spy, ids)) == tok.decode(ids)
    assert len(ids) > 1000 and longest[0] <= 10


def test_detokenizer_skips_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\nHi<|im_end|>")
    assert "".join(stream(tok, ids)) == "assistant\nHi"
    assert "".join(stream(tok, ids, skip=False)) == "<|im_start|>assistant\nHi<|im_end|>"
