"""POST /tokenize, POST /detokenize and GET /tokenizer_info: the tokenizer alone, no model run (they answer while
draining too: a router may tokenize before it sees the 503 of /health)."""

from __future__ import annotations

from server.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
    chat_template_input,
)
from server.openai.serving import APIError, check_unicode
from server.openai.serving_chat import OpenAIServingChat


class OpenAIServingTokenization:
    """The tokenizer endpoints; messages are rendered by the chat endpoint's template."""

    def __init__(self, chat: OpenAIServingChat) -> None:
        self.chat = chat
        self.tokenizer = chat.tokenizer
        self.limits = chat.limits

    def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        self.chat.check_model(body.model)
        if body.messages is not None:
            # The same rendering as /v1/chat/completions.
            tokens = self.chat.render_prompt(chat_template_input(body.messages), body.tools,
                                             body.add_generation_prompt, add_special_tokens=body.add_special_tokens)
        else:
            check_unicode(body.prompt or "", "prompt")
            tokens = self.tokenizer.encode(body.prompt or "", body.add_special_tokens)
        # vLLM's token_strs: the vocabulary strings (byte-level form, 'Ġthe'), as convert_ids_to_tokens gives them.
        strs = [self.tokenizer.id_to_token(t) or "" for t in tokens] if body.return_token_strs else None
        return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=self.limits.max_model_len,
                                token_strs=strs)

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self.chat.check_model(body.model)
        vocab_size = self.tokenizer.vocab_size
        bad = next((t for t in body.tokens if t >= vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab_size})", param="tokens")
        # Special tokens are kept, so /detokenize inverts /tokenize also for chat messages (vLLM does the same).
        return DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens, skip_special_tokens=False))

    def tokenizer_info(self) -> TokenizerInfoResponse:
        """vLLM's GET /tokenizer_info: what a client needs to tokenize as the server does (lm-eval's remote
        tokenizer reads the special tokens and the chat template)."""
        tok = self.tokenizer
        bos = tok.bos_token_id
        return TokenizerInfoResponse(
            # A tokenizer.json is what transformers loads as PreTrainedTokenizerFast.
            tokenizer_class="PreTrainedTokenizerFast", eos_token=tok.token_text(tok.eos_token_id),
            eos_token_id=tok.eos_token_id, bos_token=None if bos is None else tok.token_text(bos), bos_token_id=bos,
            model_max_length=self.limits.max_model_len, chat_template=self.chat.chat_template.source)
