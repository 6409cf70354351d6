"""The model and tokenizer endpoints as vLLM's clients use them: GET /v1/models/{id} (the openai SDK's
models.retrieve), /tokenize's vLLM fields (add_special_tokens, return_token_strs: what `vllm bench serve` and
lm-eval send), GET /tokenizer_info, and lm-eval's own remote tokenizer against a live server when lm-eval is
importable."""

from __future__ import annotations

import httpx
import jinja2
import openai
import pytest

from server.tokenizer import Tokenizer
from tests.server.live import LiveServer
from tests.server.sse import assert_error

MAX_MODEL_LEN = 512  # the tiny checkpoint's max_position_embeddings
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Grüß dich 😀"}]


def test_models_retrieve_gives_the_listed_model(oai: openai.OpenAI, http: httpx.Client) -> None:
    [listed] = http.get("/v1/models").json()["data"]
    model = oai.models.retrieve("customllm")
    assert model.id == "customllm" and model.object == "model" and model.owned_by == listed["owned_by"]
    assert http.get("/v1/models/customllm").json() == listed
    assert http.head("/v1/models/customllm").status_code == 200


@pytest.mark.parametrize("name", ["gpt-4o", "customllm2", "org/customllm"])
def test_models_retrieve_of_an_unknown_id_is_a_404(oai: openai.OpenAI, http: httpx.Client, name: str) -> None:
    error = assert_error(http.get(f"/v1/models/{name}"), 404, "model")
    assert "customllm" in error["message"] and error["type"] == "NotFoundError"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve(name)


def test_models_retrieve_is_counted_under_its_route_template(server: LiveServer, http: httpx.Client) -> None:
    before = server.metric("customllm_http_requests_total", {"route": "/v1/models/{model}", "status": "404"})
    http.get("/v1/models/nope")
    after = server.metric("customllm_http_requests_total", {"route": "/v1/models/{model}", "status": "404"})
    assert after == before + 1


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_tokenize_takes_vllm_bench_serve_and_lm_eval_bodies(http: httpx.Client, tok: Tokenizer,
                                                            add_special_tokens: bool) -> None:
    # vllm bench serve's alignment probe and lm-eval's RemoteTokenizer.encode send exactly these bodies. The bundled
    # tokenizer adds no special tokens (no post-processor), so both give the plain encoding.
    text = "Hello, world! <|endoftext|>"
    for body in ({"model": "customllm", "prompt": text, "add_special_tokens": add_special_tokens},
                 {"prompt": text, "add_special_tokens": add_special_tokens}):
        response = http.post("/tokenize", json=body)
        assert response.status_code == 200, response.text
        assert response.json() == {"tokens": tok.encode(text), "count": len(tok.encode(text)),
                                   "max_model_len": MAX_MODEL_LEN}
    chat = http.post("/tokenize", json={"messages": MESSAGES, "add_special_tokens": add_special_tokens}).json()
    assert chat["tokens"] == tok.encode_chat(MESSAGES)


def test_tokenize_return_token_strs(http: httpx.Client, tok: Tokenizer) -> None:
    text = "Ünïcödé 東京 the end"
    body = http.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert body["tokens"] == tok.encode(text)
    assert body["token_strs"] == [tok.id_to_token(t) for t in body["tokens"]] and "Ġthe" in body["token_strs"]
    chat = http.post("/tokenize", json={"messages": MESSAGES, "return_token_strs": True}).json()
    assert chat["token_strs"][0] == "<|im_start|>" and len(chat["token_strs"]) == chat["count"]
    assert "token_strs" not in http.post("/tokenize", json={"prompt": text, "return_token_strs": False}).json()


@pytest.mark.parametrize("field", ["add_special_tokens", "return_token_strs"])
def test_tokenize_vllm_fields_take_booleans_only(http: httpx.Client, field: str) -> None:
    assert_error(http.post("/tokenize", json={"prompt": "x", field: "yes"}), 400, field)


def test_tokenizer_info(http: httpx.Client, tok: Tokenizer) -> None:
    info = http.get("/tokenizer_info").json()
    assert info["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert info["eos_token"] == "<|endoftext|>" and info["eos_token_id"] == tok.eos_token_id
    # The bundled tokenizer adds no BOS; clients (lm-eval) fall back to the EOS as the prefix token.
    assert info["bos_token"] is None and info["bos_token_id"] is None
    assert info["model_max_length"] == MAX_MODEL_LEN
    # The chat template as Jinja, rendering plain conversations as the server does.
    template = jinja2.Environment().from_string(info["chat_template"])
    for generation_prompt in (True, False):
        served = http.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": generation_prompt})
        rendered = template.render(messages=MESSAGES, add_generation_prompt=generation_prompt)
        assert tok.encode(rendered) == served.json()["tokens"]
    assert http.head("/tokenizer_info").status_code == 200


def test_lm_eval_remote_tokenizer(server: LiveServer, http: httpx.Client, tok: Tokenizer) -> None:
    """lm-eval's own remote tokenizer (tokenizer_backend=remote, and what its `auto` probes) against this server."""
    lm_eval_utils = pytest.importorskip("lm_eval.utils")
    base_url = f"{server.base_url}/v1/completions"  # what --model_args base_url=... holds
    assert lm_eval_utils.check_remote_tokenizer_support(base_url)
    remote = lm_eval_utils.RemoteTokenizer(base_url)
    text = "The quick brown fox 東京"
    assert remote.encode(text) == tok.encode(text) and remote.decode(tok.encode(text)) == text
    assert remote.eos_token_id == tok.eos_token_id and remote.eot_token == tok.eos_token_id
    assert remote.bos_token_id is None
    rendered = remote.apply_chat_template(MESSAGES)
    served = http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    assert tok.encode(rendered) == served


def test_lm_eval_local_completions_scores_with_the_remote_tokenizer(server: LiveServer, http: httpx.Client,
                                                                    tok: Tokenizer) -> None:
    """lm-eval's `--model local-completions` with its default tokenizer_backend (auto) finds the remote tokenizer and
    scores a continuation as the server's echoed logprobs do: no local tokenizer copy, no hub download."""
    completions = pytest.importorskip("lm_eval.models.openai_completions")
    instance = pytest.importorskip("lm_eval.api.instance")
    lm = completions.LocalCompletionsAPI(base_url=f"{server.base_url}/v1/completions", model="customllm",
                                         max_length=MAX_MODEL_LEN)
    assert lm.tokenizer_backend == "remote"
    context, continuation = "The capital of France is", " Paris"
    [(score, _)] = lm.loglikelihood([instance.Instance("loglikelihood", {}, (context, continuation), 0)])
    ids, num_context = tok.encode(context + continuation), len(tok.encode(context))
    echoed = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 1, "logprobs": 1, "echo": True,
                                                "temperature": 0}).json()["choices"][0]["logprobs"]
    assert score == pytest.approx(sum(echoed["token_logprobs"][num_context:len(ids)]))
