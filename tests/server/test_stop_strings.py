"""StopStringMatcher of server/tokenizer.py: stop strings split anywhere, overlaps, held-back text, a random
reference, and the matcher fed by the detokenizer."""

import random

import pytest

from server.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer


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
