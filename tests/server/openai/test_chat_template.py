"""Chat templates (server/openai/chat_template.py): the bundled ChatML stays byte-identical; Hugging Face Jinja
templates from tokenizer_config.json or --chat-template, with tools and add_generation_prompt; /tokenize and the
chat endpoint render through the same template."""

import json
from pathlib import Path

import httpx
import pytest

from server.openai.chat_template import ChatMLTemplate, JinjaChatTemplate, load_chat_template
from server.openai.protocol import ChatCompletionRequest, chat_template_input
from server.tokenizer import Tokenizer, load_tokenizer
from tests.server.live import live_server
from tests.server.sse import assert_error

# The usual ChatML template as Hugging Face checkpoints write it, extended with a tools list.
HF_CHATML = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_end|> there"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(None)


def test_bundled_chatml_is_byte_identical_to_the_tokenizer_rendering(tok: Tokenizer) -> None:
    req = ChatCompletionRequest.model_validate({"messages": MESSAGES})
    messages = chat_template_input(req.messages)
    for add in (True, False):
        assert ChatMLTemplate(tok).render(messages, None, add) == tok.apply_chat_template(MESSAGES, add)


def test_a_jinja_chatml_template_renders_the_same_prompt(tok: Tokenizer) -> None:
    template = JinjaChatTemplate(HF_CHATML, "test")
    for add in (True, False):
        assert template.render(MESSAGES, None, add) == tok.apply_chat_template(MESSAGES, add)
    tools = [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "g"}}]
    assert template.render(MESSAGES, tools).startswith("<|im_start|>system\nTOOLS: f g<|im_end|>\n")


def test_source_is_the_jinja_of_the_rendering(tok: Tokenizer) -> None:
    # /tokenizer_info hands the source to clients that render themselves (lm-eval's remote tokenizer).
    assert JinjaChatTemplate(HF_CHATML, "test").source == HF_CHATML
    bundled = JinjaChatTemplate(ChatMLTemplate(tok).source, "bundled")
    for add in (True, False):
        assert bundled.render(MESSAGES, None, add) == ChatMLTemplate(tok).render(MESSAGES, None, add)


def test_continue_final_message_leaves_the_last_turn_open(tok: Tokenizer) -> None:
    for template in (ChatMLTemplate(tok), JinjaChatTemplate(HF_CHATML, "test")):
        text = template.render(MESSAGES[:3], None, add_generation_prompt=False, continue_final_message=True)
        assert text == tok.apply_chat_template(MESSAGES[:2], False) + "<|im_start|>assistant\nHello"


def test_template_sources_and_errors(tok: Tokenizer, tmp_path: Path) -> None:
    assert isinstance(load_chat_template(tok, None, str(tmp_path)), ChatMLTemplate)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": HF_CHATML, "eos_token": "</s>"}))
    beside = load_chat_template(tok, None, str(tmp_path))
    assert isinstance(beside, JinjaChatTemplate)
    file = tmp_path / "t.jinja"
    file.write_text("{{ eos_token }}{% for m in messages %}[{{ m.content }}]{% endfor %}")
    rendered = load_chat_template(tok, str(file), str(tmp_path)).render(MESSAGES[:2])
    assert rendered == "</s>[Be brief.][Hi <|im_end|> there]"
    file.write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match="does not parse"):
        load_chat_template(tok, str(file))
    with pytest.raises(ValueError, match="cannot read"):
        load_chat_template(tok, str(tmp_path / "missing.jinja"))
    failing = JinjaChatTemplate("{{ raise_exception('no system turns') }}", "t")
    with pytest.raises(ValueError, match="no system turns"):
        failing.render(MESSAGES)


def test_server_renders_chat_and_tokenize_with_the_jinja_template(tiny_checkpoint: Path, tok: Tokenizer) -> None:
    marked = HF_CHATML.replace("'<|im_start|>' + message['role']", "'<|im_start|>' + message['role'] + '*'")
    marked += "{% if fail %}{{ raise_exception('asked to fail') }}{% endif %}"
    with live_server(tiny_checkpoint, chat_template=JinjaChatTemplate(marked, "test")) as live, \
            httpx.Client(base_url=live.base_url, timeout=60) as http:
        tokens = http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
        assert tok.decode(tokens, skip_special_tokens=False).startswith("<|im_start|>system*\nBe brief.")
        usage = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1}).json()["usage"]
        assert usage["prompt_tokens"] == len(tokens)
        # chat_template_kwargs reach the template; a template that fails is a 400, not a 500.
        bad = http.post("/v1/chat/completions", json={"messages": MESSAGES, "chat_template_kwargs": {"fail": True}})
        error = assert_error(bad, 400, "messages")
        assert "asked to fail" in error["message"]
