"""Speculative decoding through the HTTP API (real uvicorn, float32 tiny model with the real tokenizer): stop
strings, a grammar and logprobs give what the same server without speculation gives, and /metrics carries vLLM's
spec_decode counters."""

from collections.abc import Iterator

import pytest

from server.engine.speculative_config import SpeculativeConfig
from server.tokenizer import load_tokenizer
from tests.server.live import LiveServer, live_server
from tests.server.openai.biased import write_biased_checkpoint

# Raised so that greedy output repeats "a" often but not always: prompt-lookup drafts are kept at some positions.
BIAS = 14.0
SPEC = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_min=1, prompt_lookup_max=3)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, LiveServer]]:
    tok = load_tokenizer(None)
    checkpoint = write_biased_checkpoint(tmp_path_factory.mktemp("spec-ckpt"), tok.encode("a"), BIAS)
    with live_server(checkpoint) as plain, live_server(checkpoint, speculative_config=SPEC) as spec:
        yield plain, spec


def complete(server: LiveServer, **body: object) -> dict:
    with server.client() as client:
        response = client.post("/v1/completions", json={"temperature": 0.0, "ignore_eos": True} | body)
    assert response.status_code == 200, response.text
    return response.json()


def test_outputs_equal_the_plain_servers_with_stop_strings_grammar_and_logprobs(servers) -> None:
    plain, spec = servers
    prompts = ["a a a b a a", "hello there, a", "x y z"]
    free = [complete(plain, prompt=p, max_tokens=40) for p in prompts]
    assert [complete(spec, prompt=p, max_tokens=40)["choices"] for p in prompts] == [f["choices"] for f in free]
    stopped = 0
    for p, body in zip(prompts, free, strict=True):
        text = body["choices"][0]["text"]
        stop = text[len(text) // 2:len(text) // 2 + 3]  # a stop string from the middle of the free output
        requests = [dict(prompt=p, max_tokens=40, stop=[stop]),
                    dict(prompt=p, max_tokens=40, logprobs=2),
                    dict(prompt=p, max_tokens=30, structured_outputs={"regex": "(a|b| )+c?"})]
        for request in requests:
            a, b = complete(plain, **request), complete(spec, **request)
            assert b["usage"] == a["usage"] and b["choices"][0]["text"] == a["choices"][0]["text"], request
            assert b["choices"][0]["finish_reason"] == a["choices"][0]["finish_reason"]
            stopped += "stop" in request and b["choices"][0]["finish_reason"] == "stop"
            if "logprobs" in request:
                assert b["choices"][0]["logprobs"]["tokens"] == a["choices"][0]["logprobs"]["tokens"]
                assert b["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(
                    a["choices"][0]["logprobs"]["token_logprobs"], abs=1e-4)
    assert stopped == len(prompts)  # every stop string ended its sample
    drafts = spec.metric("vllm:spec_decode_num_draft_tokens_total")
    accepted = spec.metric("vllm:spec_decode_num_accepted_tokens_total")
    assert 0 < accepted < drafts and spec.metric("vllm:spec_decode_num_drafts_total") > 0
    per_pos = [spec.metric("vllm:spec_decode_num_accepted_tokens_per_pos_total", {"position": str(j)})
               for j in range(4)]
    assert sum(per_pos) == accepted and per_pos[0] > 0
    assert plain.metric("vllm:spec_decode_num_drafts_total") == 0
