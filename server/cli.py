"""Command line: flags (each also read from CUSTOMLLM_<FLAG>), engine construction and the uvicorn launch."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

import uvicorn

from model import CheckpointError
from model.backends import BACKEND_FLAGS
from model.ops.quantized_linear import QUANTIZATIONS
from server.drain import DrainingServer
from server.engine.speculative_config import SpeculativeConfig
from server.metrics import ServerMetrics
from server.openai.api import ServerSettings, create_app
from server.openai.chat_template import load_chat_template
from server.startup import build_engine
from server.tokenizer import load_tokenizer

logger = logging.getLogger("server")

ENV_PREFIX = "CUSTOMLLM_"


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="customllm-server", description="OpenAI-compatible server for CustomLLM (MLA + MoE).",
        epilog="Every flag can also be set with an environment variable: CUSTOMLLM_<FLAG>, e.g. CUSTOMLLM_PORT=9000. "
               "A flag on the command line wins over the environment.")
    add = parser.add_argument
    add("--model", default=None, help="checkpoint file or directory; absent = the seed architecture with RANDOM "
                                      "weights (for trying the server, not for real use)")
    add("--tokenizer", default=None, help="tokenizer.json file or directory (default: tokenizer.json beside the "
                                          "model, else the bundled cosmo2 tokenizer)")
    add("--chat-template", default=None, help="a Jinja2 chat template file, as Hugging Face writes them (default: "
                                              "the chat_template of a tokenizer_config.json beside the model, else "
                                              "the bundled ChatML)")
    add("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 to listen on all)")
    add("--port", type=int, default=8000)
    add("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="auto = bfloat16 on CUDA and on CPUs with native bf16, else float32")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add("--quantization", default="none", choices=list(QUANTIZATIONS),
        help="int8 = int8 weight-only linears with per-output-channel scales (about half the weight memory "
             "and faster memory-bound decode on CPU; logits differ slightly from --dtype's, see docs/performance.md)")
    for flag, (op, names) in BACKEND_FLAGS.items():
        add(flag, default="auto", choices=list(names),
            help=f"the backend of {op} (auto: the first that runs here and passes its self-check against the torch "
                 "oracle; the start-up log prints a table of the chosen backends); a named backend that cannot run "
                 "is an error")
    add("--served-model-name", default="customllm", help="the model id clients send and /v1/models lists")
    add("--max-num-seqs", type=_positive_int, default=64, help="sequences running at once")
    add("--max-num-batched-tokens", type=_positive_int, default=512,
        help="tokens per engine step (prefill chunks + decodes)")
    add("--max-model-len", type=_positive_int, default=None,
        help="context limit, prompt + output (default: the model's max_position_embeddings)")
    add("--kv-cache-tokens", default=None, help="KV cache size: tokens (65536) or memory (2GiB, 500MB); default "
                                                "2GiB on CPU, on CUDA what --gpu-memory-utilization leaves free")
    add("--gpu-memory-utilization", type=_fraction, default=0.9,
        help="share of the GPU's memory this server may use (weights, activations, KV cache); sizes the KV cache "
             "on CUDA unless --kv-cache-tokens is given")
    add("--enforce-eager", type=_bool, nargs="?", const=True, default=False,
        help="no CUDA graphs: every decode step runs eagerly (vLLM's flag)")
    add("--block-size", type=_positive_int, default=16, help="tokens per KV cache block")
    add("--enable-prefix-caching", type=_bool, default=True, help="reuse cached blocks of shared prefixes")
    add("--enable-return-routed-experts", type=_bool, nargs="?", const=True, default=False,
        help="let requests ask for return_routed_experts: each token's top-k routed expert ids in every layer, "
             "base64 in each choice (SGLang's flag; docs/api.md). Steps where no request asks run as without it")
    add("--speculative-config", default=None,
        help="speculative decoding, as vLLM's JSON: '{\"method\": \"ngram\", \"num_speculative_tokens\": 4, "
             "\"prompt_lookup_min\": 2, \"prompt_lookup_max\": 5, \"disable_by_batch_size\": 8}' (prompt-lookup "
             "drafts verified in one step; off by default)")
    add("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    add("--seed", type=int, default=0, help="seed for random weights and for unseeded sampling")
    add("--max-queued-requests", type=_positive_int, default=1024,
        help="waiting requests beyond this get 503 with Retry-After")
    add("--max-request-bytes", type=_positive_int, default=1 << 20, help="largest accepted request body")
    add("--shutdown-timeout", type=_non_negative_float, default=30.0,
        help="on SIGTERM, seconds to let in-flight requests finish (new work gets 503 meanwhile); then the rest "
             "end with finish_reason 'abort'")
    add("--cors-allow-origins", default="", help="comma-separated origins allowed by CORS (default: CORS off)")
    add("--disable-playground", type=_bool, nargs="?", const=True, default=False,
        help="no playground page at GET / and /playground (404 there); the page is static and calls the API "
             "with the key its user types, so it exposes nothing the API does not")
    add("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    # Defaults come from the environment, so `--help` shows the effective values.
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        env = os.environ.get(_env_name(action.option_strings[0]))
        if env is not None:
            try:
                action.default = action.type(env) if callable(action.type) else env
            except (ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"{_env_name(action.option_strings[0])}={env!r}: {exc}")
            if action.choices is not None and action.default not in action.choices:
                parser.error(f"{_env_name(action.option_strings[0])}={env!r}: choose from {list(action.choices)}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        tokenizer_path = args.tokenizer
        if tokenizer_path is None and args.model and os.path.isfile(os.path.join(args.model, "tokenizer.json")):
            tokenizer_path = os.path.join(args.model, "tokenizer.json")
        tokenizer = load_tokenizer(tokenizer_path)
        speculative = (None if args.speculative_config is None
                       else SpeculativeConfig.from_json(args.speculative_config))
        metrics = ServerMetrics()
        engine = build_engine(args.model, dtype=args.dtype, device=args.device, seed=args.seed,
                              quantization=args.quantization, linear_backend=args.linear_backend,
                              attention_backend=args.attention_backend, moe_backend=args.moe_backend,
                              kv_cache_tokens=args.kv_cache_tokens, max_num_seqs=args.max_num_seqs,
                              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                              block_size=args.block_size, enable_prefix_caching=args.enable_prefix_caching,
                              eos_token_id=tokenizer.eos_token_id, metrics=metrics,
                              enforce_eager=args.enforce_eager, gpu_memory_utilization=args.gpu_memory_utilization,
                              enable_return_routed_experts=args.enable_return_routed_experts,
                              speculative_config=speculative)
        if engine.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                             f"{engine.vocab_size}; pass the matching --tokenizer")
        chat_template = load_chat_template(tokenizer, args.chat_template, args.model)
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"customllm-server: error: {exc}", file=sys.stderr)
        return 2
    settings = ServerSettings(
        served_model_name=args.served_model_name, api_key=args.api_key or None,
        max_queued_requests=args.max_queued_requests, max_request_bytes=args.max_request_bytes,
        cors_allow_origins=tuple(o.strip() for o in args.cors_allow_origins.split(",") if o.strip()),
        enable_playground=not args.disable_playground)
    app = create_app(engine, tokenizer, settings, metrics, chat_template)
    # The drain (server/drain.py) waits for in-flight requests before uvicorn's shutdown starts, so uvicorn's own
    # timeout only covers what is left then (nothing, unless a client stopped reading).
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5)
    logger.info("serving %s on http://%s:%d", args.served_model_name, args.host, args.port)
    if settings.enable_playground:
        logger.info("playground: http://%s:%d/ in a browser", args.host, args.port)
    # uvicorn re-raises the signal that stopped it once it has shut down, so a drained, successful shutdown would
    # end as death by SIGTERM (status -15/143) or a KeyboardInterrupt traceback. It restores the handlers it found
    # before re-raising, so with these ignored around run() the re-raise is a no-op and we exit 0; during run()
    # uvicorn's own handlers are installed and drain as usual.
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        DrainingServer(config, app.state.drain, engine.abort_all, args.shutdown_timeout).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
