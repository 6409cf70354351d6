"""Checkpoint loading: original names, every accepted format, and a clear error for each bad checkpoint."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model import CheckpointError, CustomLLM, ModelConfig, load_checkpoint, load_model
from tests.model.conftest import TINY

State = dict[str, torch.Tensor]


def original_state_dict(state: State) -> State:
    """The state dict as the training code saved it: original names plus the derived rotary buffers."""
    sd = {k: v.clone().contiguous() for k, v in state.items()}
    for n in range(TINY.num_hidden_layers):
        sd[f"decoder_layers.{n}.self_attn.rotary_emb.inv_freq"] = torch.ones(TINY.rope_dim // 2)
        sd[f"decoder_layers.{n}.self_attn.rotary_emb.cos_cached"] = torch.ones(1, 1, 8, TINY.rope_dim)
    return sd


def assert_same_weights(state: State, model: CustomLLM) -> None:
    """The (unprocessed) model holds exactly the checkpoint's tensors, in the model's dtype."""
    sd = model.state_dict()
    assert sd.keys() == state.keys()
    for k in sd:
        torch.testing.assert_close(sd[k], state[k].to(sd[k].dtype), rtol=0, atol=0, msg=k)


def test_safetensors_with_rotary_buffers_without_config(tiny_state: State, tmp_path: Path) -> None:
    save_file(original_state_dict(tiny_state), tmp_path / "model.safetensors")
    # No config.json: every size except the head count is read off the shapes (head_dim 64 assumed).
    loaded = load_model(tmp_path)
    assert loaded.config.num_attention_heads == 1 and loaded.backends is not None
    assert loaded.config.latent_dim == TINY.latent_dim and loaded.config.num_experts == TINY.num_experts
    assert_same_weights(tiny_state, load_checkpoint(tmp_path))


def test_config_json_with_training_names(tiny_state: State, tmp_path: Path) -> None:
    save_file(original_state_dict(tiny_state), tmp_path / "model.safetensors")
    # The training config's compression_ratio was never used: the latent comes from kv_proj_d's shape.
    (tmp_path / "config.json").write_text(json.dumps({
        "d_model": TINY.hidden_size, "n_heads": TINY.num_attention_heads, "compression_ratio": 0.5,
        "num_experts": TINY.num_experts, "top_k": 2, "architectures": ["CustomLLM"]}))
    loaded = load_checkpoint(tmp_path)
    assert loaded.config == TINY
    assert_same_weights(tiny_state, loaded)


def test_bin_and_training_checkpoint_directory(tiny_state: State, tmp_path: Path) -> None:
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-20").mkdir()
    torch.save({"model": original_state_dict(tiny_state)}, tmp_path / "checkpoint-20" / "pytorch_model.bin")
    torch.save({"step": torch.tensor(1)}, tmp_path / "checkpoint-20" / "optimizer.pt")
    (tmp_path / "checkpoint-20" / "config.json").write_text(json.dumps(TINY.to_dict()))
    assert_same_weights(tiny_state, load_checkpoint(tmp_path))  # picks the newest checkpoint-N
    assert_same_weights(tiny_state, load_checkpoint(tmp_path / "checkpoint-20" / "pytorch_model.bin",
                                                    config=TINY))


def test_pt_with_wrapper_prefix_and_bfloat16(tiny_state: State, tmp_path: Path) -> None:
    sd = {f"_orig_mod.{k}": v for k, v in original_state_dict(tiny_state).items()}
    torch.save(sd, tmp_path / "weights.pt")
    loaded = load_checkpoint(tmp_path / "weights.pt", dtype=torch.bfloat16, config=TINY)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert_same_weights(tiny_state, loaded)


def test_sharded_safetensors(tiny_state: State, tmp_path: Path) -> None:
    sd = original_state_dict(tiny_state)
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: sd[k] for k in keys}, tmp_path / file)
        weight_map |= {k: file for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_dict()))
    assert_same_weights(tiny_state, load_checkpoint(tmp_path))


def _save_and_load(sd: dict[str, torch.Tensor], tmp_path: Path) -> None:
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_dict()))
    load_model(tmp_path)


def test_missing_tensor(tiny_state: State, tmp_path: Path) -> None:
    sd = original_state_dict(tiny_state)
    del sd["decoder_layers.1.self_attn.rope_q.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensor decoder_layers\.1\.self_attn\.rope_q\.weight"):
        _save_and_load(sd, tmp_path)


def test_unexpected_tensor(tiny_state: State, tmp_path: Path) -> None:
    sd = original_state_dict(tiny_state) | {"final_norm.weight": torch.ones(TINY.hidden_size)}
    with pytest.raises(CheckpointError, match=r"unexpected tensor final_norm\.weight"):
        _save_and_load(sd, tmp_path)


def test_wrong_shape(tiny_state: State, tmp_path: Path) -> None:
    sd = original_state_dict(tiny_state)
    sd["decoder_layers.0.mlp.moe.routed_experts.2.up_proj.weight"] = torch.zeros(3, TINY.hidden_size)
    with pytest.raises(CheckpointError, match=r"routed_experts\.2\.up_proj\.weight: expected shape \[48, 64\], "
                                              r"found \[3, 64\]"):
        _save_and_load(sd, tmp_path)


def test_unreadable_and_absent_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read safetensors file"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_model(tmp_path)
    (tmp_path / "w.bin").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(tmp_path / "w.bin")
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match="config"):
        ModelConfig.from_json(tmp_path / "config.json")


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="num_attention_heads"):
        ModelConfig(hidden_size=768, num_attention_heads=7)
    with pytest.raises(ValueError, match="top_k_experts"):
        ModelConfig(top_k_experts=9)
    with pytest.raises(ValueError, match="vocab_size"):
        ModelConfig(vocab_size=0)


def test_random_init_is_deterministic() -> None:
    a = load_checkpoint(None, config=TINY, seed=7)
    b = load_checkpoint(None, config=TINY, seed=7)
    c = load_checkpoint(None, config=TINY, seed=8)
    assert_same_weights(a.state_dict(), b)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
