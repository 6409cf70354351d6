"""POST /v1/completions/render, /v1/chat/completions/render and GET /get_load over a live server."""

from __future__ import annotations

import httpx

from tests.server.live import LiveServer, engine_held_after


def _tokens(http: httpx.Client, **body: object) -> list[int]:
    reply = http.post("/tokenize", json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()["tokens"]


def test_completion_render_returns_one_generate_request_per_prompt(http: httpx.Client) -> None:
    prompts = ["Hello world, this is a prompt", "Another one"]
    reply = http.post("/v1/completions/render", json={
        "model": "customllm", "prompt": prompts, "max_tokens": 7, "temperature": 0.5, "stop": ["x"],
        "seed": 3, "logit_bias": {"11": 2.0}})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert isinstance(body, list) and len(body) == 2
    for item, prompt in zip(body, prompts, strict=True):
        assert item["token_ids"] == _tokens(http, prompt=prompt)
        assert item["model"] == "customllm"
        assert item["request_id"].startswith("cmpl-")
        assert item["stream"] is False and item["priority"] == 0
        sp = item["sampling_params"]
        assert (sp["max_tokens"], sp["temperature"], sp["stop"], sp["seed"], sp["n"]) == (7, 0.5, ["x"], 3, 1)
        assert sp["logit_bias"] == {"11": 2.0}
    assert body[0]["request_id"] != body[1]["request_id"]


def test_completion_render_passes_token_prompts_through(http: httpx.Client) -> None:
    reply = http.post("/v1/completions/render", json={"prompt": [[5, 6, 7], [8]], "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    assert [item["token_ids"] for item in reply.json()] == [[5, 6, 7], [8]]


def test_chat_render_matches_tokenize_and_carries_the_chat_stop_tokens(http: httpx.Client) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    reply = http.post("/v1/chat/completions/render", json={"messages": messages, "max_tokens": 5})
    assert reply.status_code == 200, reply.text
    item = reply.json()
    assert isinstance(item, dict)
    assert item["token_ids"] == _tokens(http, messages=messages)
    assert item["request_id"].startswith("chatcmpl-")
    assert item["sampling_params"]["max_tokens"] == 5
    # The end-of-turn token stops a chat reply; a token-in client needs it in the parameters.
    assert item["sampling_params"]["stop_token_ids"]


def test_render_rejects_what_generation_rejects_with_the_same_error(http: httpx.Client) -> None:
    too_long = {"prompt": "Hello", "max_tokens": 100_000}
    rendered = http.post("/v1/completions/render", json=too_long)
    generated = http.post("/v1/completions", json=too_long)
    assert rendered.status_code == generated.status_code == 400
    assert rendered.json() == generated.json()
    assert rendered.json()["error"]["param"] == "max_tokens"
    unknown = http.post("/v1/chat/completions/render",
                        json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    assert http.post("/v1/completions/render", json={"prompt": "x", "bogus": 1}).status_code == 400


def test_get_load_counts_the_requests_in_flight(server: LiveServer, http: httpx.Client) -> None:
    assert http.get("/get_load").json() == {"load": 0, "num_reqs": 0, "num_waiting_reqs": 0}
    body = {"prompt": "Count to a thousand", "max_tokens": 3, "ignore_eos": True, "stream": True}
    # The engine's second step waits, so the request is in flight when /get_load is asked.
    with engine_held_after(server, 1) as release, http.stream("POST", "/v1/completions", json=body) as stream:
        lines = stream.iter_lines()
        next(lines)  # the first chunk: the request is running
        load = http.get("/get_load").json()
        release.set()
        assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"
    assert load == {"load": 1, "num_reqs": 1, "num_waiting_reqs": 0}
    assert http.get("/get_load").json() == {"load": 0, "num_reqs": 0, "num_waiting_reqs": 0}


def test_the_fields_a_router_adds_are_accepted_at_their_no_op_values(http: httpx.Client) -> None:
    # What vllm-router 0.1.17 sends on every request it forwards (recorded from its traffic).
    completion = {"prompt": "Hello world", "max_tokens": 2, "stream": False, "echo": False, "no_stop_trim": False,
                  "ignore_eos": False, "skip_special_tokens": True, "return_hidden_states": False}
    chat = {"messages": [{"role": "user", "content": "hi"}], "stream": False, "max_tokens": 2, "logprobs": False,
            "no_stop_trim": False, "ignore_eos": False, "continue_final_message": False, "skip_special_tokens": True,
            "separate_reasoning": True, "stream_reasoning": True, "return_hidden_states": False,
            "include_reasoning": True}
    for path, body in (("/v1/completions", completion), ("/v1/completions/render", completion),
                       ("/v1/chat/completions", chat), ("/v1/chat/completions/render", chat)):
        assert http.post(path, json=body).status_code == 200, (path, http.post(path, json=body).text)
    refused = http.post("/v1/chat/completions", json=chat | {"continue_final_message": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "continue_final_message"
    refused = http.post("/v1/completions", json=completion | {"return_hidden_states": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "return_hidden_states"
