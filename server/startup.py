"""Building an engine from user-facing settings: device and dtype choice, model loading, cache sizing."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from model import CustomLLM, ModelConfig, PagedLatentCache, load_model, select_backends
from model.kv_cache import blocks_for
from model.ops.cpu_extension import cpu_flags
from model.ops.quantized_linear import QUANTIZATIONS
from server.engine.cuda_graphs import DecodeGraphRunner
from server.engine.engine import Engine
from server.engine.model_runner import ModelRunner
from server.engine.sampler import Sampler
from server.engine.scheduler import SchedulerConfig
from server.engine.speculative_config import SpeculativeConfig
from server.metrics import ServerMetrics

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)\s*$", re.IGNORECASE)
_UNITS = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def resolve_device(name: str) -> torch.device:
    """auto = cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX), which makes bf16 the fast choice."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto = bfloat16 on CUDA and on CPUs with native bf16 matmul, else float32."""
    if name == "auto":
        if device.type == "cuda" or cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return _DTYPES[name]


def parse_kv_cache_tokens(value: str, config: ModelConfig, dtype: torch.dtype) -> int:
    """A token count ("65536") or a memory size ("2GiB", "500MB") -> tokens of cache."""
    if value.strip().isdigit():
        return int(value)
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"--kv-cache-tokens must be a token count or a size like 2GiB, got {value!r}")
    size = float(match.group(1)) * _UNITS[match.group(2)[:-1].lower()]
    return int(size // PagedLatentCache.bytes_per_token(config, dtype))


# GPU memory kept out of the KV cache for activations: a 512-token prefill step (~50 MB), logits of 256 sampled
# rows in float32 (50 MB), the CUDA graphs' shared pool (about one largest-bucket step) and allocator slack.
_GPU_ACTIVATION_RESERVE = 1 << 30


def gpu_cache_bytes(free: int, total: int, utilization: float) -> int:
    """KV cache bytes when this server may use `utilization` of the GPU's memory, of which `total - free` is
    already taken (weights, the CUDA context, other processes)."""
    if not 0.0 < utilization <= 1.0:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {utilization}")
    budget = int(utilization * total) - (total - free) - _GPU_ACTIVATION_RESERVE
    if budget <= 0:
        raise ValueError(f"--gpu-memory-utilization {utilization} leaves no room for the KV cache: "
                         f"{(total - free) / 2**30:.2f} of {total / 2**30:.2f} GiB are in use already; raise it or "
                         f"give --kv-cache-tokens")
    return budget


def off_main_thread(fn: Callable[[], _T]) -> _T:
    """fn() on a short-lived thread, so the main thread never runs a parallel torch op.

    Why: the engine steps the model on its own thread. A second OpenMP thread pool (libgomp keeps one per thread
    that ever ran a parallel region, for the life of that thread) makes libgomp manage more threads than there
    are CPUs, and it then stops spinning between parallel regions: every step got ~1.7x slower (seed model,
    batch 1: 68 -> 120 ms). A finished thread's pool is freed with it.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="customllm-load") as pool:
        return pool.submit(fn).result()


def load_for_serving(model_path: str | None, dtype: torch.dtype, device: torch.device, seed: int,
                     quantization: str = "none", config: ModelConfig | None = None, *, linear_backend: str = "auto",
                     attention_backend: str = "auto", moe_backend: str = "auto") -> CustomLLM:
    """Choose every op's backend (quantization included), log them as one table, then load and process the
    weights once. A backend named that cannot run is a ValueError naming the flag, the backend and why."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    backends = select_backends(device, dtype, quantization, linear=linear_backend, attention=attention_backend,
                               moe=moe_backend)
    logger.info("%s", backends.table())
    return load_model(model_path, dtype=dtype, device=device, seed=seed, config=config, backends=backends)


def build_engine(model_path: str | None, *, dtype: str = "auto", device: str = "auto", seed: int = 0,
                 quantization: str = "none", linear_backend: str = "auto", attention_backend: str = "auto",
                 moe_backend: str = "auto",
                 kv_cache_tokens: str | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 max_model_len: int | None = None, block_size: int = 16, enable_prefix_caching: bool = True,
                 eos_token_id: int = 0, metrics: ServerMetrics | None = None,
                 model_config: ModelConfig | None = None, enforce_eager: bool = False,
                 gpu_memory_utilization: float = 0.9, enable_return_routed_experts: bool = False,
                 speculative_config: SpeculativeConfig | None = None) -> Engine:
    """Load the model, size its cache and capture the decode graphs (CUDA); the engine is returned not yet started.

    kv_cache_tokens None: 2GiB on CPU; on CUDA what gpu_memory_utilization leaves free after the weights.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if model_path is None:
        logger.warning("\n" + "!" * 78 + "\n!! No --model given: serving the seed architecture with RANDOM weights. "
                       "Its output is\n!! noise. Pass --model PATH to serve a trained checkpoint.\n" + "!" * 78)
    model = off_main_thread(lambda: load_for_serving(
        model_path, torch_dtype, torch_device, seed, quantization, model_config, linear_backend=linear_backend,
        attention_backend=attention_backend, moe_backend=moe_backend))
    config = model.config
    max_len = max_model_len or config.max_position_embeddings
    if max_len > config.max_position_embeddings:
        raise ValueError(f"--max-model-len {max_len} exceeds the model's max_position_embeddings "
                         f"{config.max_position_embeddings}")
    per_token = PagedLatentCache.bytes_per_token(config, torch_dtype)
    if kv_cache_tokens is not None:
        tokens = parse_kv_cache_tokens(kv_cache_tokens, config, torch_dtype)
        sized_by = "--kv-cache-tokens"
    elif torch_device.type == "cuda":
        free, total = torch.cuda.mem_get_info(torch_device)
        tokens = gpu_cache_bytes(free, total, gpu_memory_utilization) // per_token
        sized_by = f"--gpu-memory-utilization {gpu_memory_utilization} of {total / 2**30:.1f} GiB"
    else:
        tokens = parse_kv_cache_tokens("2GiB", config, torch_dtype)
        sized_by = "the CPU default of 2GiB"
    num_blocks = blocks_for(tokens, block_size)
    if num_blocks * block_size < max_len:
        raise ValueError(f"--kv-cache-tokens gives room for {num_blocks * block_size} tokens, less than one "
                         f"sequence of max_model_len={max_len}; raise it to at least {max_len}")
    # Validated here, before the cache is allocated.
    scheduler_config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                       max_model_len=max_len, block_size=block_size, num_blocks=num_blocks,
                                       enable_prefix_caching=enable_prefix_caching)
    use_graphs = torch_device.type == "cuda" and not enforce_eager
    # With CUDA graphs one block more than the scheduler knows of: the scratch block padding rows write.
    cache = off_main_thread(lambda: PagedLatentCache(config, num_blocks + use_graphs, block_size, torch_dtype,
                                                     torch_device))
    logger.info("model: %s params, %s on %s; KV cache: %d tokens (%d blocks of %d), "
                "%s bytes per token (%.1f KB), %.2f GiB, sized by %s",
                f"{model.num_parameters:,}", torch_dtype, torch_device, num_blocks * block_size, num_blocks, block_size,
                f"{per_token:,}", per_token / 1000, per_token * num_blocks * block_size / 2**30, sized_by)
    decode_runner = None
    if use_graphs:
        decode_runner = DecodeGraphRunner(model, cache.layers, max_num_seqs=max_num_seqs,
                                          max_blocks_per_seq=blocks_for(max_len, block_size), block_size=block_size,
                                          scratch_block=num_blocks, use_cuda_graphs=True,
                                          record_routed_experts=enable_return_routed_experts)
        try:
            off_main_thread(decode_runner.capture_all)
        except RuntimeError as exc:  # e.g. an op that syncs with the host: serve eagerly rather than not at all
            logger.warning("CUDA graph capture failed (%s); decode steps run eagerly", exc)
            decode_runner = None
    elif torch_device.type == "cuda":
        logger.info("--enforce-eager: decode steps run without CUDA graphs")
    if metrics is not None:
        metrics.set_kv_cache_info(per_token, num_blocks * block_size)
        metrics.set_cache_config(block_size, num_blocks, enable_prefix_caching,
                                 str(torch_dtype).removeprefix("torch."))
        metrics.set_info(model_path or "random-seed-weights", str(torch_dtype).removeprefix("torch."),
                         str(torch_device))
        if speculative_config is not None:
            metrics.set_num_speculative_tokens(speculative_config.num_speculative_tokens)
    if speculative_config is not None:
        logger.info("speculative decoding: %s", speculative_config)
    runner = ModelRunner(model, cache, Sampler(seed=seed), eos_token_id, decode_runner, enable_return_routed_experts)
    return Engine(runner, scheduler_config, config.vocab_size, metrics, speculative_config=speculative_config)
