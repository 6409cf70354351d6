"""The Tokenizer of server/tokenizer.py: loading, known encodings, token texts and bytes, the chat template."""

import hashlib
import re
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import processors

from server.tokenizer import Tokenizer, load_tokenizer

BUNDLED = Path(__file__).resolve().parents[2] / "server" / "tokenizer.json"
BUNDLED_SHA256 = "9ca9acddb6525a194ec8ac7a87f24fbba7232a9a15ffa1af0c1224fcd888e47c"
FFFD = "\ufffd"


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
