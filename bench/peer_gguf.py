"""The peer config (bench/peer/config.json) as a GGUF for llama.cpp: architecture `deepseek2`, random weights.

llama.cpp runs DeepSeek's MLA with the absorbed ("MQA") layout its converter writes (convert_hf_to_gguf.py's
DeepseekV2Model): one KV head of kv_lora_rank + rope width, kv_b_proj split into attn_k_b (transposed) and
attn_v_b, the routed experts stacked into one 3-d tensor per projection, sigmoid routing with its correction bias
in exp_probs_b. Norms, the router and that bias stay float32; every other matrix is bf16 or Q8_0. The vocabulary
is this project's bundled tokenizer (server/tokenizer.json) as a GPT-2 style BPE with llama.cpp's `smollm`
pre-tokenizer, so its KV cache holds (kv_lora_rank + rope) x layers values per token, as this server's does.

Tensors are written one at a time (the GGUF's header first), so memory stays at the largest tensor. The `gguf`
package comes from the llama.cpp tree (its gguf-py directory, `--gguf-py`); it is not a dependency of this project.

  python bench/peer_gguf.py --gguf-py <llama.cpp>/gguf-py --out peer-bf16.gguf [--weights bf16|q8_0]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEER_CONFIG = ROOT / "bench" / "peer" / "config.json"
TOKENIZER = ROOT / "server" / "tokenizer.json"
ARCH = "deepseek2"
WEIGHT_TYPES = ("bf16", "q8_0")
# gguf's LlamaFileType for general.file_type, and its TokenType values.
FILE_TYPE = {"bf16": 32, "q8_0": 7}
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # numpy order, outermost first (GGUF's ne reversed)
    kind: str  # "weight": bf16 or Q8_0; "norm" (ones), "router", "bias" (zeros): float32


def tensor_specs(config: dict[str, Any]) -> list[TensorSpec]:
    """Every tensor llama.cpp's deepseek2 loader needs for `config`, in file order."""
    if config.get("first_k_dense_replace", 0) != 0:
        raise ValueError(f"first_k_dense_replace={config['first_k_dense_replace']}: only all-MoE layers are written")
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    heads, q_rank, kv_rank = config["num_attention_heads"], config["q_lora_rank"], config["kv_lora_rank"]
    nope, rope, v_dim = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    experts, ffn = config["n_routed_experts"], config["moe_intermediate_size"]
    shared_ffn = ffn * config["n_shared_experts"]
    specs = [TensorSpec("token_embd.weight", (vocab, hidden), "weight"),
             TensorSpec("output_norm.weight", (hidden,), "norm"),
             TensorSpec("output.weight", (vocab, hidden), "weight")]
    for i in range(config["num_hidden_layers"]):
        b = f"blk.{i}"
        specs += [
            TensorSpec(f"{b}.attn_norm.weight", (hidden,), "norm"),
            TensorSpec(f"{b}.attn_q_a_norm.weight", (q_rank,), "norm"),
            TensorSpec(f"{b}.attn_kv_a_norm.weight", (kv_rank,), "norm"),
            TensorSpec(f"{b}.attn_q_a.weight", (q_rank, hidden), "weight"),
            TensorSpec(f"{b}.attn_q_b.weight", (heads * (nope + rope), q_rank), "weight"),
            TensorSpec(f"{b}.attn_kv_a_mqa.weight", (kv_rank + rope, hidden), "weight"),
            # kv_b_proj [heads x (nope + v), kv_rank] split per head; the key half transposed for absorption.
            TensorSpec(f"{b}.attn_k_b.weight", (heads, kv_rank, nope), "weight"),
            TensorSpec(f"{b}.attn_v_b.weight", (heads, v_dim, kv_rank), "weight"),
            TensorSpec(f"{b}.attn_output.weight", (hidden, heads * v_dim), "weight"),
            TensorSpec(f"{b}.ffn_norm.weight", (hidden,), "norm"),
            TensorSpec(f"{b}.ffn_gate_inp.weight", (experts, hidden), "router"),
            TensorSpec(f"{b}.exp_probs_b.bias", (experts,), "bias"),
            TensorSpec(f"{b}.ffn_gate_exps.weight", (experts, ffn, hidden), "weight"),
            TensorSpec(f"{b}.ffn_up_exps.weight", (experts, ffn, hidden), "weight"),
            TensorSpec(f"{b}.ffn_down_exps.weight", (experts, hidden, ffn), "weight"),
            TensorSpec(f"{b}.ffn_gate_shexp.weight", (shared_ffn, hidden), "weight"),
            TensorSpec(f"{b}.ffn_up_shexp.weight", (shared_ffn, hidden), "weight"),
            TensorSpec(f"{b}.ffn_down_shexp.weight", (hidden, shared_ffn), "weight"),
        ]
    return specs


def model_metadata(config: dict[str, Any], weights: str) -> list[tuple[str, bool | int | float | str]]:
    """The GGUF keys of the model (general.architecture aside: the writer adds it). Ints are uint32."""
    if config.get("scoring_func") != "sigmoid":
        raise ValueError(f"scoring_func={config.get('scoring_func')!r}: only sigmoid routing is written")
    a = ARCH
    kv_rank, rope = config["kv_lora_rank"], config["qk_rope_head_dim"]
    return [
        ("general.name", "customllm-peer"),
        ("general.file_type", FILE_TYPE[weights]),
        (f"{a}.block_count", config["num_hidden_layers"]),
        (f"{a}.context_length", config["max_position_embeddings"]),
        (f"{a}.embedding_length", config["hidden_size"]),
        (f"{a}.feed_forward_length", config["intermediate_size"]),
        (f"{a}.attention.head_count", config["num_attention_heads"]),
        # MLA as MQA: one KV head holding the latent and the shared rope key.
        (f"{a}.attention.head_count_kv", 1),
        (f"{a}.rope.freq_base", float(config["rope_theta"])),
        (f"{a}.attention.layer_norm_rms_epsilon", float(config["rms_norm_eps"])),
        (f"{a}.expert_count", config["n_routed_experts"]),
        (f"{a}.expert_used_count", config["num_experts_per_tok"]),
        (f"{a}.expert_group_count", config["n_group"]),
        (f"{a}.expert_group_used_count", config["topk_group"]),
        (f"{a}.expert_gating_func", 2),  # sigmoid
        (f"{a}.leading_dense_block_count", config["first_k_dense_replace"]),
        (f"{a}.vocab_size", config["vocab_size"]),
        (f"{a}.attention.q_lora_rank", config["q_lora_rank"]),
        (f"{a}.attention.kv_lora_rank", kv_rank),
        (f"{a}.attention.key_length", kv_rank + rope),
        (f"{a}.attention.value_length", kv_rank),
        (f"{a}.attention.key_length_mla", config["qk_nope_head_dim"] + rope),
        (f"{a}.attention.value_length_mla", config["v_head_dim"]),
        (f"{a}.expert_feed_forward_length", config["moe_intermediate_size"]),
        (f"{a}.expert_shared_count", config["n_shared_experts"]),
        (f"{a}.expert_weights_scale", float(config["routed_scaling_factor"])),
        (f"{a}.expert_weights_norm", bool(config["norm_topk_prob"])),
        (f"{a}.rope.dimension_count", rope),
    ]


def tokenizer_metadata(tokenizer: dict[str, Any], vocab_size: int) -> list[tuple[str, Any]]:
    """tokenizer.json's byte-level BPE as llama.cpp's `gpt2` tokenizer; its added (special) tokens as control."""
    by_id = {i: token for token, i in tokenizer["model"]["vocab"].items()}
    special = {t["id"] for t in tokenizer["added_tokens"] if t["special"]}
    if sorted(by_id) != list(range(vocab_size)):
        raise ValueError(f"the tokenizer's ids are not 0..{vocab_size - 1}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    return [
        ("tokenizer.ggml.model", "gpt2"),
        ("tokenizer.ggml.pre", "smollm"),
        ("tokenizer.ggml.tokens", [by_id[i] for i in range(vocab_size)]),
        ("tokenizer.ggml.token_type", [TOKEN_CONTROL if i in special else TOKEN_NORMAL for i in range(vocab_size)]),
        ("tokenizer.ggml.merges", merges),
        ("tokenizer.ggml.bos_token_id", 0),
        ("tokenizer.ggml.eos_token_id", 0),
        ("tokenizer.ggml.add_bos_token", False),  # prompts arrive as token ids, as they do to the other servers
    ]


def write_gguf(gguf: Any, config: dict[str, Any], tokenizer: dict[str, Any], out: Path, weights: str,
               seed: int = 0) -> None:
    """Write the GGUF to `out` (through a temporary name, so a cut-short write leaves no file behind)."""
    import numpy as np

    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[weights]
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(partial, ARCH)
    for key, value in model_metadata(config, weights) + tokenizer_metadata(tokenizer, config["vocab_size"]):
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)  # int32 or string elements
    specs = tensor_specs(config)
    for spec in specs:
        if spec.kind == "weight":
            byte_shape = gguf.quants.quant_shape_to_byte_shape(spec.shape, qtype)
            writer.add_tensor_info(spec.name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=qtype)
        else:
            writer.add_tensor_info(spec.name, spec.shape, np.dtype(np.float32), 4 * math.prod(spec.shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    std = config["initializer_range"]
    for spec in specs:
        if spec.kind == "weight":
            data = gguf.quants.quantize(rng.standard_normal(spec.shape, dtype=np.float32) * std, qtype)
        elif spec.kind == "router":
            data = rng.standard_normal(spec.shape, dtype=np.float32) * std
        else:
            data = np.full(spec.shape, 1.0 if spec.kind == "norm" else 0.0, dtype=np.float32)
        writer.write_tensor_data(data)
    writer.close()
    partial.replace(out)


def import_gguf(gguf_py: Path) -> Any:
    """llama.cpp's gguf-py package, from its tree."""
    if not (gguf_py / "gguf" / "__init__.py").exists():
        raise FileNotFoundError(f"no gguf package under {gguf_py} (expected <llama.cpp>/gguf-py)")
    sys.path.insert(0, str(gguf_py))
    import gguf

    return gguf


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf-py", required=True, help="the llama.cpp tree's gguf-py directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--weights", choices=WEIGHT_TYPES, default="bf16")
    parser.add_argument("--config", default=str(PEER_CONFIG))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    gguf = import_gguf(Path(args.gguf_py))
    start = time.monotonic()
    write_gguf(gguf, json.loads(Path(args.config).read_text()), json.loads(TOKENIZER.read_text()), Path(args.out),
               args.weights, args.seed)
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {size / 1e9:.2f} GB, {args.weights}, in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
