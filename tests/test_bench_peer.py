"""The peer benchmark's parts that run without the peers: the GGUF writer's tensors and keys against the peer
config, the load generator on llama-server's stream, the llama-server command and log, the summary table."""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench import peer_gguf, peer_llama, peer_report, serve
from model import ModelConfig

CONFIG = json.loads(peer_gguf.PEER_CONFIG.read_text())
TOKENIZER = json.loads(peer_gguf.TOKENIZER.read_text())


def hf_parameter_count(c: dict[str, Any]) -> int:
    """DeepSeek-V3's checkpoint (vLLM's side of the comparison), tensor by tensor, from its config."""
    h, heads, experts = c["hidden_size"], c["num_attention_heads"], c["n_routed_experts"]
    q_rank, kv_rank, rope = c["q_lora_rank"], c["kv_lora_rank"], c["qk_rope_head_dim"]
    ffn = c["moe_intermediate_size"]
    attention = (h * q_rank + q_rank + q_rank * heads * (c["qk_nope_head_dim"] + rope)  # q_a, its norm, q_b
                 + h * (kv_rank + rope) + kv_rank  # kv_a_proj_with_mqa, its norm
                 + kv_rank * heads * (c["qk_nope_head_dim"] + c["v_head_dim"])  # kv_b_proj
                 + heads * c["v_head_dim"] * h)  # o_proj
    moe = experts * h + experts + (experts + c["n_shared_experts"]) * 3 * h * ffn  # gate, its bias, experts
    layer = 2 * h + attention + moe  # two norms
    return 2 * c["vocab_size"] * h + h + c["num_hidden_layers"] * layer  # embeddings, lm_head, final norm


def test_the_gguf_holds_the_peer_checkpoint_tensor_for_tensor() -> None:
    specs = peer_gguf.tensor_specs(CONFIG)
    assert len({s.name for s in specs}) == len(specs) == 3 + 18 * CONFIG["num_hidden_layers"]
    assert sum(math.prod(s.shape) for s in specs) == hf_parameter_count(CONFIG)
    by_name = {s.name: s for s in specs}
    # kv_b_proj [12 x (32 + 64), 512] split per head, the key half transposed for absorption.
    assert by_name["blk.29.attn_k_b.weight"].shape == (12, 512, 32)
    assert by_name["blk.29.attn_v_b.weight"].shape == (12, 64, 512)
    assert by_name["blk.0.attn_kv_a_mqa.weight"].shape == (512 + 64, 768)
    assert by_name["blk.0.ffn_gate_exps.weight"].shape == (7, 1536, 768)
    assert by_name["blk.0.ffn_down_exps.weight"].shape == (7, 768, 1536)
    assert by_name["blk.0.exp_probs_b.bias"].shape == (7,)
    float32 = {s.name.split(".", 2)[-1] if s.name.startswith("blk.") else s.name for s in specs if s.kind != "weight"}
    assert float32 == {"output_norm.weight", "attn_norm.weight", "attn_q_a_norm.weight", "attn_kv_a_norm.weight",
                       "ffn_norm.weight", "ffn_gate_inp.weight", "exp_probs_b.bias"}
    # Q8_0 quantizes rows in blocks of 32.
    assert all(s.shape[-1] % 32 == 0 for s in specs if s.kind == "weight")


def test_its_kv_cache_holds_what_this_server_caches_per_token() -> None:
    keys = dict(peer_gguf.model_metadata(CONFIG, "bf16"))
    per_layer = keys["deepseek2.attention.key_length"] * keys["deepseek2.attention.head_count_kv"]
    seed = ModelConfig()
    ours = seed.kv_entry_dim  # c_kv and every head's rotated k_rope
    assert per_layer == ours == 576
    assert 2 * per_layer * keys["deepseek2.block_count"] == 2 * ours * seed.num_hidden_layers == 34_560
    assert keys["deepseek2.attention.key_length_mla"] == 96 and keys["deepseek2.attention.value_length_mla"] == 64
    assert keys["deepseek2.expert_gating_func"] == 2  # sigmoid
    assert keys["general.file_type"] == 32 and dict(peer_gguf.model_metadata(CONFIG, "q8_0"))["general.file_type"] == 7


def test_the_vocabulary_is_the_bundled_tokenizer_with_its_special_tokens_as_control() -> None:
    keys = dict(peer_gguf.tokenizer_metadata(TOKENIZER, CONFIG["vocab_size"]))
    assert (keys["tokenizer.ggml.model"], keys["tokenizer.ggml.pre"]) == ("gpt2", "smollm")
    tokens, types = keys["tokenizer.ggml.tokens"], keys["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 49152
    assert tokens[0] == "<|endoftext|>" and types[0] == peer_gguf.TOKEN_CONTROL
    assert tokens[TOKENIZER["model"]["vocab"]["Ġthe"]] == "Ġthe"
    assert types.count(peer_gguf.TOKEN_CONTROL) == sum(t["special"] for t in TOKENIZER["added_tokens"])
    assert keys["tokenizer.ggml.merges"][0] == "Ġ t" and len(keys["tokenizer.ggml.merges"]) == 48900
    assert keys["tokenizer.ggml.bos_token_id"] == keys["tokenizer.ggml.eos_token_id"] == 0


def vendored_gguf() -> Any:
    """llama.cpp's gguf-py from the peer benchmark's cache (the llama-cpp-python sdist), else an installed one."""
    cache = Path(os.environ.get("CUSTOMLLM_BENCH_CACHE", Path.home() / ".cache" / "customllm-bench"))
    tree = cache / f"llama_cpp_python-{peer_llama.LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp" / "gguf-py"
    if (tree / "gguf").is_dir() and str(tree) not in sys.path:
        sys.path.insert(0, str(tree))
    return pytest.importorskip("gguf", reason="needs llama.cpp's gguf-py: run `python bench/peer_llama.py` once")


@pytest.mark.parametrize("weights", peer_gguf.WEIGHT_TYPES)
def test_a_written_gguf_reads_back_with_the_specs_shapes_types_and_keys(weights: str, tmp_path: Path) -> None:
    gguf = vendored_gguf()
    tiny = CONFIG | {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "q_lora_rank": 32,
                     "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 32, "v_head_dim": 32,
                     "num_attention_heads": 2, "moe_intermediate_size": 64, "intermediate_size": 64}
    # The tokenizer's first 256 ids (gguf's reader takes seconds per thousand strings).
    vocab = {token: i for token, i in TOKENIZER["model"]["vocab"].items() if i < 256}
    tokenizer = {"model": {"vocab": vocab, "merges": TOKENIZER["model"]["merges"][:10]},
                 "added_tokens": TOKENIZER["added_tokens"]}
    path = tmp_path / "tiny.gguf"
    peer_gguf.write_gguf(gguf, tiny, tokenizer, path, weights)
    reader = gguf.GGUFReader(path)
    specs = peer_gguf.tensor_specs(tiny)
    assert [t.name for t in reader.tensors] == [s.name for s in specs]
    weight_type = {"bf16": "BF16", "q8_0": "Q8_0"}[weights]
    for tensor, spec in zip(reader.tensors, specs, strict=True):
        assert tuple(int(n) for n in reversed(tensor.shape)) == spec.shape, spec.name
        assert tensor.tensor_type.name == (weight_type if spec.kind == "weight" else "F32"), spec.name
    assert reader.get_field("general.architecture").contents() == "deepseek2"
    for key, value in peer_gguf.model_metadata(tiny, weights) + peer_gguf.tokenizer_metadata(tokenizer, 256):
        field = reader.get_field(key)
        assert field is not None, key
        assert field.contents() == pytest.approx(value), key
    # The names this writer spells out are gguf's own.
    assert gguf.Keys.LLM.EXPERT_GATING_FUNC.format(arch="deepseek2") in reader.fields
    assert gguf.Keys.Attention.KV_LORA_RANK.format(arch="deepseek2") in reader.fields
    norm = next(t for t in reader.tensors if t.name == "blk.1.attn_kv_a_norm.weight")
    assert norm.data.tolist() == [1.0] * 64


def level(concurrency: int, tok_s: float, ttft: float) -> dict[str, Any]:
    return {"concurrency": concurrency, "output_tok_per_s": tok_s, "ttft_s": {"p50": ttft}}


def test_the_summary_puts_every_run_and_our_ratios_to_each_peer_in_one_row_per_level() -> None:
    results = {
        "vllm-default": {"ok": True, "levels": [level(1, 5.0, 2.0), level(32, 8.0, 50.0)]},
        "vllm-both-cpus": {"ok": True, "levels": [level(1, 8.0, 1.5), level(32, 13.0, 40.0)]},
        "llama.cpp-bf16": {"ok": True, "levels": [level(1, 20.0, 0.4), level(32, 40.0, 9.0)]},
        "llama.cpp-q8_0": {"ok": False, "error": "did not start"},
        "customllm": {"ok": True, "levels": [level(1, 16.0, 0.5), level(32, 60.0, 6.0)]},
        "customllm-int8": {"ok": True, "levels": [level(1, 12.0, 0.6), level(32, 30.0, 8.0)]},
    }
    rows = peer_report.summarise(results)
    assert [r["concurrency"] for r in rows] == [1, 32]
    one = rows[0]
    assert one["customllm_tok_s"] == 16.0 and one["customllm_int8_ttft_p50"] == 0.6
    assert one["vllm_default_tok_s"] == 5.0 and one["vllm_both-cpus_tok_s"] == 8.0
    assert one["llama_cpp_bf16_tok_s"] == 20.0 and "llama_cpp_q8_0_tok_s" not in one
    assert one["vllm_best_setup"] == "both-cpus" and one["ratio_vs_vllm_best"] == 2.0
    assert one["ratio_vs_llama_cpp"] == 0.8 and rows[1]["ratio_vs_llama_cpp"] == 1.5
    assert "ratio_int8_vs_llama_cpp_q8_0" not in one  # the Q8_0 run failed
    table = peer_report.format_table(rows, results).splitlines()
    assert [c.strip() for c in table[0].split("|")] == [
        "conc", "this server", "this server, int8", "vLLM default", "vLLM both-cpus", "llama.cpp bf16",
        "vs vLLM best", "vs llama.cpp"]
    assert [c.strip() for c in table[1].split("|")] == [
        "1", "16.0 tok/s   0.50 s", "12.0 tok/s   0.60 s", "5.0 tok/s   2.00 s", "8.0 tok/s   1.50 s",
        "20.0 tok/s   0.40 s", "2.00x", "0.80x"]


def test_the_report_script_prints_the_table_again_from_a_runs_json(tmp_path: Path, capsys: Any) -> None:
    runs = {"customllm": {"ok": True, "levels": [level(4, 30.0, 1.0)]},
            "llama.cpp-q8_0": {"ok": True, "levels": [level(4, 40.0, 2.0)]},
            "customllm-int8": {"ok": True, "levels": [level(4, 20.0, 1.5)]}}
    path = tmp_path / "peer.json"
    path.write_text(json.dumps({"runs": runs}))
    peer_report.main([str(path)])
    lines = capsys.readouterr().out.splitlines()
    assert [c.strip() for c in lines[0].split("|")] == ["conc", "this server", "this server, int8", "llama.cpp Q8_0",
                                                        "int8 vs Q8_0"]
    assert lines[1].split("|")[-1].strip() == "0.50x"


# llama-server's stream for 8 tokens in, 4 out with timings_per_token (recorded from the build bench/peer_llama.py
# makes; id, model, created and the other timings fields left out): usage comes only in a last event of its own.
LLAMA_SERVER_STREAM = b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in [
    *({"choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": None}],
       "object": "text_completion", "timings": {"prompt_n": 8, "predicted_n": n}}
      for n, text in enumerate(["tri", "syn", "syn", "syn"], start=1)),
    {"choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}], "object": "text_completion",
     "usage": {"completion_tokens": 4, "prompt_tokens": 8, "total_tokens": 12,
               "prompt_tokens_details": {"cached_tokens": 0}}, "timings": {"prompt_n": 8, "predicted_n": 4}},
]) + b"data: [DONE]\n\n"


def test_the_load_generator_counts_llama_servers_tokens_as_they_arrive() -> None:
    sent: list[dict[str, Any]] = []

    def replay(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(200, content=LLAMA_SERVER_STREAM, headers={"content-type": "text/event-stream"})

    async def one() -> serve.RequestResult:
        async with httpx.AsyncClient(base_url="http://peer", transport=httpx.MockTransport(replay)) as client:
            return await serve.one_request(client, "peer", list(range(100, 108)), 4, True,
                                           {"timings_per_token": True})

    result = asyncio.run(one())
    assert sent[0]["timings_per_token"] is True and sent[0]["ignore_eos"] is True
    assert result.ok and (result.output_tokens, result.prompt_tokens) == (4, 8)
    assert len(result.itls) == 3  # the first token is the TTFT, not a gap; the usage event adds none
    assert 0 < result.ttft <= result.e2e


def test_tokens_are_counted_from_usage_where_every_chunk_has_it_and_from_timings_otherwise() -> None:
    ours = {"choices": [{"text": " a b", "index": 0}], "usage": {"completion_tokens": 7, "prompt_tokens": 64}}
    assert serve.tokens_so_far(ours, 5) == 7
    last = {"choices": [], "usage": {"completion_tokens": 9}, "timings": {"predicted_n": 9}}
    assert serve.tokens_so_far(last, 8) == 9
    assert serve.tokens_so_far({"choices": [{"text": "x"}], "timings": {"predicted_n": 3}}, 2) == 3
    assert serve.tokens_so_far({"choices": [{"text": "x"}]}, 2) == 2  # nothing says: no new token counted


def test_llama_servers_kv_cache_line_gives_bytes_per_token() -> None:
    line = ("0.01.529.314 I llama_kv_cache: size =  540.00 MiB (   256 cells,  30 layers, 64/64 seqs), "
            "K (f16):  540.00 MiB, V (f16):    0.00 MiB")
    assert peer_llama.kv_bytes_per_token("...\n" + line + "\n...") == 34_560
    assert peer_llama.kv_bytes_per_token("no such line") is None


def test_llama_server_runs_one_slot_per_stream_without_a_prompt_cache() -> None:
    cmd = peer_llama.server_command(Path("llama-server"), Path("peer.gguf"), 8080, 64, 8192, 2)
    def value(flag: str) -> str:
        return cmd[cmd.index(flag) + 1]

    assert (value("--parallel"), value("--ctx-size"), value("--threads"), value("--cache-ram")) == ("64", "8192",
                                                                                                 "2", "0")
    assert "--cont-batching" in cmd
