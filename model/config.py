"""ModelConfig: the architecture's sizes. Defaults are the seed model of MODEL_SPEC.md."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Names used by the original training config and by common conventions, mapped to ours.
# `num_experts` counts shared + routed experts; DeepSeek's `n_routed_experts` counts routed only,
# so it is handled separately in `from_dict`.
_ALIASES: dict[str, str] = {
    "n_vocab": "vocab_size",
    "d_model": "hidden_size",
    "dim": "hidden_size",
    "n_embd": "hidden_size",
    "hidden_dim": "hidden_size",
    "n_layer": "num_hidden_layers",
    "n_layers": "num_hidden_layers",
    "num_layers": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_heads": "num_attention_heads",
    "num_heads": "num_attention_heads",
    "kv_lora_rank": "latent_dim",
    "d_ff": "intermediate_size",
    "ffn_dim": "intermediate_size",
    "moe_intermediate_size": "intermediate_size",
    "n_experts": "num_experts",
    "n_shared_experts": "num_shared_experts",
    "top_k": "top_k_experts",
    "num_experts_per_tok": "top_k_experts",
    "n_activated_experts": "top_k_experts",
    "max_seq_len": "max_position_embeddings",
    "max_seq_length": "max_position_embeddings",
    "n_positions": "max_position_embeddings",
    "block_size": "max_position_embeddings",
    "context_length": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "layer_norm_eps": "rms_norm_eps",
    "layer_norm_epsilon": "rms_norm_eps",
    "rope_base": "rope_theta",
}

# Fields of training configs that do not change the inference architecture. `compression_ratio`
# was ignored by the original code (the latent is always read off kv_proj_d's shape).
_IGNORED = {"compression_ratio", "dropout", "attention_dropout", "hidden_dropout", "torch_dtype",
            "architectures", "model_type", "transformers_version", "bos_token_id", "eos_token_id",
            "pad_token_id", "tie_word_embeddings", "initializer_range", "use_cache"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes of a CustomLLM. Derived sizes are properties, never stored."""

    vocab_size: int = 49152
    hidden_size: int = 768
    num_hidden_layers: int = 30
    num_attention_heads: int = 12
    latent_dim: int = 192
    intermediate_size: int = 1536
    num_experts: int = 8
    num_shared_experts: int = 1
    top_k_experts: int = 2
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "latent_dim",
                      "intermediate_size", "num_experts", "max_position_embeddings"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{field} must be a positive integer, got {value!r}")
        if not isinstance(self.num_shared_experts, int) or not 0 <= self.num_shared_experts < self.num_experts:
            raise ValueError(f"ModelConfig.num_shared_experts must be in [0, num_experts={self.num_experts}), "
                             f"got {self.num_shared_experts!r}")
        if not isinstance(self.top_k_experts, int) or not 1 <= self.top_k_experts <= self.num_routed_experts:
            raise ValueError(f"ModelConfig.top_k_experts must be in [1, num_routed_experts="
                             f"{self.num_routed_experts}], got {self.top_k_experts!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"ModelConfig.hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 4:
            # head_dim splits into a no-position half and a RoPE half, and RoPE halves that again.
            raise ValueError(f"ModelConfig head_dim = hidden_size / num_attention_heads = {self.head_dim} "
                             "must be a multiple of 4")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"ModelConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def nope_dim(self) -> int:
        """Per-head width of the position-free part of q and k."""
        return self.head_dim // 2

    @property
    def rope_dim(self) -> int:
        """Per-head width of the rotary part of q and k."""
        return self.head_dim // 2

    @property
    def num_routed_experts(self) -> int:
        return self.num_experts - self.num_shared_experts

    @property
    def kv_entry_dim(self) -> int:
        """Values cached per token per layer: the kv latent plus every head's rotated k_rope (576 for the seed)."""
        return self.latent_dim + self.num_attention_heads * self.rope_dim

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Build from our field names or the training config's names; unknown fields are ignored."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        routed = raw.get("n_routed_experts")
        for key, value in raw.items():
            name = _ALIASES.get(key, key)
            if key == "n_routed_experts" or key in _IGNORED:
                continue
            if name not in fields:
                logger.debug("config field %r is not used by the server", key)
                continue
            if name in values and values[name] != value:
                raise ValueError(f"config gives {name} twice with different values: {values[name]!r} and "
                                 f"{value!r} (from {key!r})")
            values[name] = value
        if routed is not None:
            shared = values.get("num_shared_experts", cls.num_shared_experts)
            values.setdefault("num_experts", routed + shared)
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Read a config.json."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read model config {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ValueError(f"model config {path} must hold a JSON object, got {type(raw).__name__}")
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
