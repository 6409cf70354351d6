"""Tests for server/tokenizer.py: loading, encodings, chat template, detokenizer, stop strings."""

import hashlib
import random
import re
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import processors

from server.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer, load_tokenizer

BUNDLED = Path(__file__).resolve().parents[2] / "server" / "tokenizer.json"
BUNDLED_SHA256 = "9ca9acddb6525a194ec8ac7a87f24fbba7232a9a15ffa1af0c1224fcd888e47c"
FFFD = "\ufffd"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(None)


# --- loading -----------------------------------------------------------------------------------


def test_bundled_file_is_the_released_tokenizer() -> None:
    assert hashlib.sha256(BUNDLED.read_bytes()).hexdigest() == BUNDLED_SHA256


def test_bundled_facts(tok: Tokenizer) -> None:
    assert tok.vocab_size == 49152
    assert tok.eos_token_id == 0
    assert tok.chat_stop_token_ids == (2,)
    assert tok.special_token_ids == frozenset(range(17))
    assert tok.id_to_token(2) == "<|im_end|>"
    assert tok.token_to_id("<|im_start|>") == 1
    assert tok.token_to_id("no such token") is None


def test_load_from_file_and_directory(tmp_path: Path) -> None:
    shutil.copy(BUNDLED, tmp_path / "tokenizer.json")
    from_dir = load_tokenizer(str(tmp_path))
    from_file = load_tokenizer(tmp_path / "tokenizer.json")
    assert from_dir.encode("Hello") == from_file.encode("Hello") == [19556]
    assert from_file.source == str(tmp_path / "tokenizer.json")


def test_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        load_tokenizer(str(missing))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        load_tokenizer(tmp_path)  # a directory without tokenizer.json


def test_invalid_file_names_it(tmp_path: Path) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match=r"broken\.json"):
        load_tokenizer(bad)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match=r"binary\.json"):
        load_tokenizer(binary)


# --- encode / decode ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("Hello", [19556]),
        ("The capital of France is", [504, 3575, 282, 4649, 314]),
        ("def fibonacci(n):", [1604, 3987, 46477, 24, 94, 727]),
        ("<|im_start|>user\nHi<|im_end|>", [1, 4093, 198, 26843, 2]),
    ],
)
def test_known_encodings(tok: Tokenizer, text: str, ids: list[int]) -> None:
    assert tok.encode(text) == ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    texts = ["Hello", "日本語", "", "<|endoftext|>x"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_add_special_tokens_applies_the_post_processor(tok: Tokenizer) -> None:
    # The bundled tokenizer has no post-processor: nothing is added, and it has no BOS.
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi") and tok.bos_token_id is None
    backend = BackendTokenizer.from_str(tok.to_json())
    backend.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                           special_tokens=[("<|im_start|>", 1)])
    with_bos = Tokenizer(backend, "test")
    assert with_bos.bos_token_id == 1
    assert with_bos.encode("hi", add_special_tokens=True) == [1, *tok.encode("hi")]
    assert with_bos.encode("hi") == tok.encode("hi")  # what prompts get: nothing added


def test_decode_skips_special_tokens_by_default(tok: Tokenizer) -> None:
    ids = [1, 4093, 198, 26843, 2]
    assert tok.decode(ids) == "user\nHi"
    assert tok.decode([0]) == ""
    assert tok.decode([0], skip_special_tokens=False) == "<|endoftext|>"


@pytest.mark.parametrize("bad", [-1, 49152, 10**9])
def test_decode_rejects_out_of_range_ids(tok: Tokenizer, bad: int) -> None:
    with pytest.raises(ValueError, match=str(bad)):
        tok.decode([5, bad])


def test_token_text_and_bytes_agree_for_every_token(tok: Tokenizer) -> None:
    for token_id in range(tok.vocab_size):
        raw = tok.token_bytes(token_id)
        assert raw.decode("utf-8", errors="replace") == tok.token_text(token_id), token_id


def test_token_bytes_rebuild_multibyte_text(tok: Tokenizer) -> None:
    text = "日本語 🙂 naïve"
    ids = tok.encode(text)
    assert any(tok.token_text(i) == FFFD for i in ids)  # some tokens hold part of a character
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert tok.token_bytes(2) == b"<|im_end|>"
    assert tok.token_text(2) == "<|im_end|>"


def test_bytes_without_a_token_vanish(tok: Tokenizer) -> None:
    # README: eight bytes that occur in valid UTF-8 have no token and are dropped by encoding.
    assert tok.decode(tok.encode("a\x04b\x06c")) == "abc"


# --- chat template -----------------------------------------------------------------------------


def test_chat_template_is_chatml_without_default_system_prompt(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    no_prompt = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert no_prompt == "<|im_start|>user\nHi<|im_end|>\n"


def test_chat_template_multi_turn(tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
    ]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\n3+3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_encode_chat_uses_special_token_ids(tok: Tokenizer) -> None:
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[:5] == [1, 4093, 198, 26843, 2]
    assert ids[-3:] == tok.encode("<|im_start|>assistant\n")[-3:]
    assert ids.count(1) == 2 and ids.count(2) == 1


def test_chat_template_rejects_non_string_content(tok: Tokenizer) -> None:
    with pytest.raises(TypeError, match=r"messages\[1\]"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user"}])


# --- incremental detokenizer -------------------------------------------------------------------

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


# --- stop strings ------------------------------------------------------------------------------


def reference_stop(text: str, stops: list[str], include: bool) -> tuple[str, bool]:
    """The expected output: cut at the match that ends first (the longest on a tie)."""
    matches = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
    if not matches:
        return text, False
    end, _, s = min(matches)
    return text[: end if include else end - len(s)], True


def run_matcher(deltas: list[str], stops: list[str], include: bool) -> tuple[str, bool, StopStringMatcher]:
    matcher = StopStringMatcher(stops, include)
    out, stopped = [], False
    for d in deltas:
        emitted, stopped = matcher.add(d)
        out.append(emitted)
        assert len(matcher._pending) <= max(map(len, stops), default=1) - 1
    out.append(matcher.flush())
    return "".join(out), stopped, matcher


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_split_at_every_position(include: bool) -> None:
    text = "Hello world STOP after"
    expected = "Hello world STOP" if include else "Hello world "
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            out, stopped, matcher = run_matcher([text[:i], text[i:j], text[j:]], ["STOP"], include)
            assert (out, stopped) == (expected, True), (i, j)
            assert matcher.stop_str == "STOP" and matcher.output_len == len(expected)


def test_stop_string_one_char_at_a_time() -> None:
    text = "abc\n\nUser: hi"
    out, stopped, _ = run_matcher(list(text), ["\n\nUser:"], False)
    assert (out, stopped) == ("abc", True)


def test_held_back_text_released_on_flush() -> None:
    matcher = StopStringMatcher(["Hello"])
    assert matcher.add("say Hel") == ("say ", False)
    assert matcher.add("l") == ("", False)
    assert matcher.add("p") == ("Hellp", False)
    assert matcher.add("!He") == ("!", False)
    assert matcher.flush() == "He"
    assert not matcher.stopped


def test_stop_at_the_very_start() -> None:
    for include, expected in ((False, ""), (True, "###")):
        matcher = StopStringMatcher(["###"], include)
        assert matcher.add("### and more") == (expected, True)
        assert matcher.add("ignored") == ("", True)
        assert matcher.flush() == ""


def test_overlapping_stop_strings_first_end_wins() -> None:
    assert run_matcher(["xabcd"], ["bcd", "abc"], False)[0] == "x"
    assert run_matcher(["xab", "cd"], ["abcd", "bc"], True)[0] == "xabc"
    # Same end: the longer one, so that it does not matter how the text was split.
    assert run_matcher(["x", "abc"], ["bc", "abc"], True)[0] == "xabc"
    assert run_matcher(["xa", "b", "c"], ["abc", "bc"], False)[0] == "x"


def test_no_stop_strings_passes_text_through() -> None:
    matcher = StopStringMatcher([])
    assert matcher.add("anything") == ("anything", False)
    assert matcher.flush() == ""


def test_empty_stop_string_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["ok", ""])


def random_text(rng: random.Random, alphabet: str, min_len: int, max_len: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len)))


def test_stop_matcher_matches_reference_on_random_splits() -> None:
    rng = random.Random(7)
    alphabet = "ab\n日🙂"
    for _ in range(2000):
        text = random_text(rng, alphabet, 0, 25)
        stops = [random_text(rng, alphabet, 1, 4) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(0, 6)))
        deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        include = rng.random() < 0.5
        out, stopped, _ = run_matcher(deltas, stops, include)
        assert (out, stopped) == reference_stop(text, stops, include), (text, stops, deltas)


def test_detokenizer_then_stop_matcher(tok: Tokenizer) -> None:
    # A stop string made of several tokens, some holding partial characters.
    ids = tok.encode("Answer: 42 🙂 END🙂 junk")
    detok = IncrementalDetokenizer(tok)
    matcher = StopStringMatcher([" END🙂"])
    out = []
    for i in ids:
        emitted, stopped = matcher.add(detok.add(i))
        out.append(emitted)
        if stopped:
            break
    assert "".join(out) == "Answer: 42 🙂" and matcher.stopped
