"""POST /v1/completions/render and /v1/chat/completions/render: vLLM's token-in request, without generating.

A router with a token-level prefix tree (vllm-router's cache_aware policy, llm-d's precise prefix routing)
asks a replica to render a request before it picks where to send it: the prompt as the replica's tokenizer and
chat template make it, and the sampling parameters. The shape is vLLM's `GenerateRequest`: completions answer
a list of them (one per prompt), chat answers one. The request goes through the same parsing and checks as
the generation endpoints, so a request that would get a 400 there gets the same 400 here; nothing is queued.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from server.engine.sampling_params import SamplingParams
from server.openai.protocol import ChatCompletionRequest, CompletionRequest
from server.openai.serving import Prompt
from server.openai.serving_chat import OpenAIServingChat
from server.openai.serving_completions import OpenAIServingCompletion


def vllm_sampling_params(params: SamplingParams) -> dict[str, Any]:
    """`params` under vLLM's SamplingParams field names, as JSON values."""
    fields = dataclasses.asdict(params)
    fields["stop"] = list(params.stop)
    fields["stop_token_ids"] = list(params.stop_token_ids)
    # Stored as sorted (token_id, bias) pairs; vLLM's is a {token_id: bias} object (None when empty).
    pairs = params.logit_bias
    assert isinstance(pairs, tuple), "SamplingParams normalises logit_bias to pairs"
    fields["logit_bias"] = {str(t): b for t, b in pairs} or None
    return fields


class OpenAIServingRender:
    """Both render endpoints, over the generation endpoints' own prompt and parameter building."""

    def __init__(self, completions: OpenAIServingCompletion, chat: OpenAIServingChat) -> None:
        self.completions = completions
        self.chat = chat

    def _generate_request(self, request_id: str, prompt: Prompt, params: SamplingParams,
                          req: CompletionRequest | ChatCompletionRequest) -> dict[str, Any]:
        self.completions._validate_prompt(prompt, params)  # the context-length check of a real request
        stream_options = req.stream_options.model_dump() if req.stream_options is not None else None
        return {"request_id": request_id, "token_ids": prompt.token_ids, "features": None,
                "sampling_params": vllm_sampling_params(params), "model": self.completions.limits.served_model_name,
                "stream": req.stream, "stream_options": stream_options, "cache_salt": None, "priority": 0,
                "kv_transfer_params": None}

    def render_completion(self, req: CompletionRequest) -> list[dict[str, Any]]:
        """One GenerateRequest per prompt."""
        self.completions.check_model(req.model)
        prompts = self.completions.completion_prompts(req)
        params = self.completions._sampling_params(req, max(req.max_tokens, 1), req.logprobs)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        return [self._generate_request(f"{request_id}-{i}", p, params, req) for i, p in enumerate(prompts)]

    def render_chat(self, req: ChatCompletionRequest) -> dict[str, Any]:
        """The rendered conversation as one GenerateRequest."""
        prompt, params = self.chat.chat_prompt(req)
        return self._generate_request(f"chatcmpl-{uuid.uuid4().hex}", prompt, params, req)
