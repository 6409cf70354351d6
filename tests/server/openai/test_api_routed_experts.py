"""return_routed_experts (SGLang's field) on completions and chat over real HTTP: each choice's rows, decoded from
base64, are the float32 reference's routing of the tokens the model read (the prompt, then each generated token but
the last), whole and streamed (the chunks' rows concatenated are the whole), for each of n choices, after a
prefix-cache hit, through chunked prefill and when a stop string cuts the choice; refused with a 400 when the server
has the flag off or the value is not a boolean; no field for requests that do not ask."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from server.cli import build_parser
from server.engine.outputs import SequenceOutput
from server.openai.choice import ChoiceBuilder
from server.tokenizer import Tokenizer
from tests.model.reference import reference_routing
from tests.server.live import TINY_SERVE, LiveServer, live_server
from tests.server.openai.test_api_cli import _start_cli_server
from tests.server.sse import assert_error, stream_chunks

PROMPT = "The sea was calm that morning"
LONG_PROMPT = " ".join(["The lighthouse keeper counted the ships that passed the rocks at night."] * 4)
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]
ASK = {"max_tokens": 8, "temperature": 0, "ignore_eos": True, "return_routed_experts": True,
       "return_token_ids": True}
CHUNK = 32  # the server's token budget per step: LONG_PROMPT's prefill takes several steps


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[LiveServer]:
    with live_server(tiny_checkpoint, enable_return_routed_experts=True, max_num_batched_tokens=CHUNK) as live:
        yield live


@pytest.fixture(scope="module")
def state(tiny_checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(tiny_checkpoint / "model.safetensors")


def decode(field: dict[str, Any]) -> np.ndarray:
    """The documented decoding: base64 -> little-endian int32 -> [T, L, K]."""
    assert set(field) == {"shape", "dtype", "data"} and field["dtype"] == "int32"
    return np.frombuffer(base64.b64decode(field["data"]), dtype="<i4").reshape(field["shape"])


def assert_reference(state: dict[str, torch.Tensor], prompt_ids: list[int], token_ids: list[int],
                     rows: np.ndarray) -> None:
    read = prompt_ids + token_ids[:-1]
    assert rows.shape == (len(read), TINY_SERVE.num_hidden_layers, TINY_SERVE.top_k_experts)
    want = reference_routing(state, TINY_SERVE, read).numpy()
    assert np.array_equal(rows, want), np.argwhere(rows != want)[:5]


def post(http: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def streamed_rows(chunks: list[dict[str, Any]], num_prompt_tokens: int, index: int = 0) -> np.ndarray:
    """One choice's rows over its chunks, checking each chunk's share: the chunk with the first token carries the
    prompt's rows, every token after the first the row of the token before it, chunks without tokens none."""
    pieces, num_tokens = [], 0
    for chunk in chunks:
        for c in chunk["choices"]:
            if c["index"] != index:
                continue
            new = len(c.get("token_ids") or [])
            if not new:
                assert "routed_experts" not in c, c
                continue
            rows = decode(c["routed_experts"])
            assert len(rows) == (num_prompt_tokens - 1 if num_tokens == 0 else 0) + new
            pieces.append(rows)
            num_tokens += new
    return np.concatenate(pieces)


@pytest.mark.parametrize("prompt", [PROMPT, LONG_PROMPT], ids=["short", "chunked-prefill"])
def test_completion_whole_and_streamed(http: httpx.Client, state, prompt: str) -> None:
    body = ASK | {"prompt": prompt}
    whole = post(http, "/v1/completions", body)
    choice = whole["choices"][0]
    rows = decode(choice["routed_experts"])
    usage = whole["usage"]
    assert len(rows) == usage["prompt_tokens"] + usage["completion_tokens"] - 1
    assert_reference(state, choice["prompt_token_ids"], choice["token_ids"], rows)
    chunks = stream_chunks(http, "/v1/completions", body)
    assert np.array_equal(streamed_rows(chunks, usage["prompt_tokens"]), rows)


def test_chat_whole_and_streamed(http: httpx.Client, state) -> None:
    body = ASK | {"messages": MESSAGES}
    whole = post(http, "/v1/chat/completions", body)
    choice = whole["choices"][0]
    rows = decode(choice["routed_experts"])
    prompt_ids = whole["prompt_token_ids"]
    assert_reference(state, prompt_ids, choice["token_ids"], rows)
    chunks = stream_chunks(http, "/v1/chat/completions", body)
    assert "routed_experts" not in chunks[0]["choices"][0]  # the role chunk
    assert np.array_equal(streamed_rows(chunks, len(prompt_ids)), rows)


@pytest.mark.parametrize("stream", [False, True])
def test_each_of_n_choices_has_its_own_rows(http: httpx.Client, state, stream: bool) -> None:
    body = ASK | {"prompt": PROMPT, "n": 2, "temperature": 1.0, "seed": 3}
    whole = post(http, "/v1/completions", body)
    choices = sorted(whole["choices"], key=lambda c: c["index"])
    assert choices[0]["token_ids"] != choices[1]["token_ids"]
    prompt_ids = choices[0]["prompt_token_ids"]
    chunks = stream_chunks(http, "/v1/completions", body) if stream else []
    for c in choices:
        rows = streamed_rows(chunks, len(prompt_ids), c["index"]) if stream else decode(c["routed_experts"])
        assert_reference(state, prompt_ids, c["token_ids"], rows)


def test_prefix_cache_hit_keeps_the_cached_tokens_rows(server: LiveServer, http: httpx.Client, state) -> None:
    plain = {"prompt": LONG_PROMPT + " Once", "max_tokens": 2, "temperature": 0}
    bm = server.engine.scheduler.block_manager
    post(http, "/v1/completions", plain)
    hits = bm.num_prefix_hit_tokens
    post(http, "/v1/completions", plain)
    assert bm.num_prefix_hit_tokens > hits  # the prompt's blocks are in the prefix cache
    choice = post(http, "/v1/completions", ASK | {"prompt": plain["prompt"]})["choices"][0]
    assert_reference(state, choice["prompt_token_ids"], choice["token_ids"], decode(choice["routed_experts"]))


def test_stop_string_cuts_the_rows_with_the_tokens(http: httpx.Client, tok: Tokenizer, state) -> None:
    free = post(http, "/v1/completions", ASK | {"prompt": PROMPT, "max_tokens": 12})["choices"][0]
    # A stop string that ends the choice inside the output: the text of the 4th token, where it first appears.
    stop = tok.decode([free["token_ids"][3]]).strip()
    assert stop and stop in free["text"]
    for stream in (False, True):
        body = ASK | {"prompt": PROMPT, "max_tokens": 12, "stop": [stop]}
        if stream:
            chunks = stream_chunks(http, "/v1/completions", body | {"stream_options": {"include_usage": True}})
            token_ids = [t for chunk in chunks for c in chunk["choices"] for t in c.get("token_ids") or []]
            rows = streamed_rows(chunks, len(free["prompt_token_ids"]))
            assert len(token_ids) == chunks[-1]["usage"]["completion_tokens"]
        else:
            response = post(http, "/v1/completions", body)
            token_ids, rows = response["choices"][0]["token_ids"], decode(response["choices"][0]["routed_experts"])
            assert len(token_ids) == response["usage"]["completion_tokens"]
        assert len(token_ids) < 12
        assert_reference(state, free["prompt_token_ids"], token_ids, rows)


def test_coalesced_output_cut_by_a_stop_string_keeps_the_kept_tokens_rows(tok: Tokenizer) -> None:
    """A reader that lags gets several tokens in one output; a stop string inside them ends the choice there, and
    the rows of the tokens after it go with them."""
    prompt_ids, tokens = tok.encode("Once"), tok.encode(" upon a time there")
    builder = ChoiceBuilder(0, tok, prompt_ids, [" a"], False, True, ())
    rows = np.arange((len(prompt_ids) + len(tokens) - 1) * 6, dtype=np.int32).reshape(-1, 2, 3)
    # Two steps' pieces merged into one output: the prompt and " upon"'s rows, then the rows of the other three.
    builder.add(SequenceOutput(0, tokens, routed_experts=[rows[:len(prompt_ids)], rows[len(prompt_ids):]]))
    assert builder.finish_reason == "stop" and builder.token_ids == tokens[:2]  # " upon", " a"
    routed = builder.routed_experts()
    assert routed is not None and routed.shape == [len(prompt_ids) + 1, 2, 3]
    assert np.array_equal(decode(routed.model_dump()), rows[:len(prompt_ids) + 1])


def test_echo_without_tokens_has_the_prompts_rows(http: httpx.Client, state) -> None:
    choice = post(http, "/v1/completions", ASK | {"prompt": PROMPT, "max_tokens": 0, "echo": True})["choices"][0]
    prompt_ids = choice["prompt_token_ids"]
    rows = decode(choice["routed_experts"])
    assert len(rows) == len(prompt_ids)  # the model read the whole prompt and generated nothing
    assert np.array_equal(rows, reference_routing(state, TINY_SERVE, prompt_ids).numpy())


@pytest.mark.parametrize("ask", [False, None])
def test_no_field_unless_asked(http: httpx.Client, ask: bool | None) -> None:
    for path, body in (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": MESSAGES})):
        body = body | {"max_tokens": 4, "return_routed_experts": ask}
        assert "routed_experts" not in post(http, path, body)["choices"][0]
        for chunk in stream_chunks(http, path, body):
            assert all("routed_experts" not in c for c in chunk["choices"])


@pytest.mark.parametrize("value", ["true", 1, [True], {"x": 1}])
def test_non_boolean_is_a_400(http: httpx.Client, value: Any) -> None:
    for path, body in (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": MESSAGES})):
        assert_error(http.post(path, json=body | {"return_routed_experts": value}), 400, "return_routed_experts")


def test_refused_when_the_server_has_the_flag_off(tiny_checkpoint: Path) -> None:
    with live_server(tiny_checkpoint) as off, off.client() as http:
        for path, body in (("/v1/completions", {"prompt": PROMPT}),
                           ("/v1/chat/completions", {"messages": MESSAGES}),
                           ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0, "echo": True})):
            error = assert_error(http.post(path, json=body | {"return_routed_experts": True}), 400,
                                 "return_routed_experts")
            assert "--enable-return-routed-experts" in error["message"]
        assert "routed_experts" not in post(http, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})["choices"][0]


def test_flag_is_a_switch_and_takes_a_value_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert build_parser().parse_args([]).enable_return_routed_experts is False
    assert build_parser().parse_args(["--enable-return-routed-experts"]).enable_return_routed_experts is True
    assert build_parser().parse_args(["--enable-return-routed-experts", "false"]).enable_return_routed_experts is False
    monkeypatch.setenv("CUSTOMLLM_ENABLE_RETURN_ROUTED_EXPERTS", "1")
    assert build_parser().parse_args([]).enable_return_routed_experts is True
    assert "return_routed_experts" in build_parser().format_help()


def test_cli_flag_reaches_the_engine(tiny_checkpoint: Path, tmp_path: Path) -> None:
    proc, base = _start_cli_server(tiny_checkpoint, tmp_path / "server.log", "--enable-return-routed-experts")
    try:
        with httpx.Client(base_url=base, timeout=60) as http:
            choice = post(http, "/v1/completions", ASK | {"prompt": PROMPT, "max_tokens": 3})["choices"][0]
        assert decode(choice["routed_experts"]).shape[0] == len(choice["prompt_token_ids"]) + 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)
