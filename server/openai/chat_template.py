"""Chat templates: messages (and tools) to prompt text.

Two renderers behind one interface, chosen once at start-up:
- `ChatMLTemplate` (the default): the tokenizer's ChatML rendering, byte for byte, for plain conversations; with
  tools, Hermes-style turns (the tools listed in the system turn, calls in `<tool_call>` blocks, results in
  `<tool_response>` blocks of a user turn), which is what SmolLM2/Qwen-family models were trained on;
- `JinjaChatTemplate`: a Hugging Face `chat_template` (from `--chat-template FILE` or the `tokenizer_config.json`
  beside the model), rendered the way transformers renders it (sandboxed Jinja2, trim_blocks, lstrip_blocks).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import jinja2
import jinja2.sandbox

from server.openai.tool_parsers import CALL_END, CALL_START
from server.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Message = Mapping[str, Any]

_TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n")
_TOOLS_CLOSING = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    f'{CALL_START}{CALL_END} XML tags:\n{CALL_START}\n{{"name": <function-name>, "arguments": <args-json-object>}}'
    f"\n{CALL_END}")


# The usual ChatML template of Hugging Face checkpoints: ChatMLTemplate's rendering of a conversation without tools.
CHATML_JINJA = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


class ChatTemplate(Protocol):
    """Renders a conversation as the prompt text the model continues."""

    name: str
    source: str  # as Jinja, for clients that render themselves (/tokenizer_info)

    def render(self, messages: Sequence[Message], tools: list[dict[str, Any]] | None = None,
               add_generation_prompt: bool = True, continue_final_message: bool = False,
               kwargs: Mapping[str, Any] | None = None) -> str: ...


def _cut_after_final_message(text: str, messages: Sequence[Message]) -> str:
    """The rendering up to the end of the last message's content, so the model continues it (as transformers
    does for continue_final_message)."""
    final = str(messages[-1].get("content") or "")
    at = text.rfind(final) if final else -1
    if at < 0:
        raise ValueError("continue_final_message: the last message's content is not in the rendered prompt")
    return text[:at + len(final)]


class ChatMLTemplate:
    """The bundled ChatML rendering (server/tokenizer.py), with Hermes-style tool turns."""

    name = "chatml (bundled)"
    source = CHATML_JINJA  # tool turns are rendered here only

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    def render(self, messages: Sequence[Message], tools: list[dict[str, Any]] | None = None,
               add_generation_prompt: bool = True, continue_final_message: bool = False,
               kwargs: Mapping[str, Any] | None = None) -> str:
        uses_tools = bool(tools) or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)
        if not uses_tools:
            plain = [{"role": m["role"], "content": m["content"]} for m in messages]
            text = self._tokenizer.apply_chat_template(plain, add_generation_prompt)
        else:
            text = self._render_with_tools(messages, tools or [], add_generation_prompt)
        return _cut_after_final_message(text, messages) if continue_final_message else text

    @staticmethod
    def _render_with_tools(messages: Sequence[Message], tools: list[dict[str, Any]],
                           add_generation_prompt: bool) -> str:
        parts = []
        rest = list(messages)
        if tools:
            system = rest.pop(0)["content"] + "\n\n" if rest and rest[0]["role"] == "system" else ""
            listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
            parts.append(f"<|im_start|>system\n{system}{_TOOLS_PREAMBLE}{listed}{_TOOLS_CLOSING}<|im_end|>\n")
        for i, m in enumerate(rest):
            role, content = m["role"], m["content"]
            if role == "tool":
                # Consecutive tool results share one user turn.
                first = i == 0 or rest[i - 1]["role"] != "tool"
                last = i == len(rest) - 1 or rest[i + 1]["role"] != "tool"
                parts.append(("<|im_start|>user" if first else "") + f"\n<tool_response>\n{content}\n</tool_response>"
                             + ("<|im_end|>\n" if last else ""))
                continue
            calls = [f"{CALL_START}\n" + json.dumps({"name": c["function"]["name"],
                                                     "arguments": c["function"]["arguments"]}, ensure_ascii=False)
                     + f"\n{CALL_END}" for c in m.get("tool_calls") or ()]
            body = "\n".join(([content] if content else []) + calls)
            parts.append(f"<|im_start|>{role}\n{body}<|im_end|>\n")
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


class JinjaChatTemplate:
    """A Hugging Face chat template."""

    def __init__(self, source: str, name: str, special_tokens: Mapping[str, str] | None = None) -> None:
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template {name} does not parse: {exc}") from exc
        self.name = name
        self.source = source
        self._special_tokens = dict(special_tokens or {})

    def render(self, messages: Sequence[Message], tools: list[dict[str, Any]] | None = None,
               add_generation_prompt: bool = True, continue_final_message: bool = False,
               kwargs: Mapping[str, Any] | None = None) -> str:
        variables = {**self._special_tokens, **(kwargs or {})}
        try:
            text = self._template.render(messages=[dict(m) for m in messages], tools=tools or None,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as exc:
            raise ValueError(f"the chat template failed: {exc}") from exc
        return _cut_after_final_message(text, messages) if continue_final_message else text


def _special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        if isinstance(value, dict):  # an AddedToken written out
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def load_chat_template(tokenizer: Tokenizer, template_file: str | None = None,
                       model_dir: str | None = None) -> ChatTemplate:
    """`--chat-template FILE` if given, else the chat_template of a tokenizer_config.json beside the model, else
    the bundled ChatML. Raises ValueError naming the file for one that cannot be read or parsed."""
    config: dict[str, Any] = {}
    config_file = Path(model_dir) / "tokenizer_config.json" if model_dir and Path(model_dir).is_dir() else None
    if config_file is not None and config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read {config_file}: {exc}") from exc
    if template_file is not None:
        try:
            source = Path(template_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the chat template {template_file!r}: {exc}") from exc
        template: ChatTemplate = JinjaChatTemplate(source, repr(template_file), _special_tokens(config))
    else:
        found = config.get("chat_template")
        if isinstance(found, list):  # named templates; "default" is the chat one
            found = next((t.get("template") for t in found if t.get("name") == "default"), None)
        if not isinstance(found, str):
            template = ChatMLTemplate(tokenizer)
        else:
            template = JinjaChatTemplate(found, f"{config_file}", _special_tokens(config))
    logger.info("chat template: %s", template.name)
    return template
