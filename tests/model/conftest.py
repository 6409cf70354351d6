import pytest
import torch

from model import CustomLLM, ModelConfig, load_model, select_backends

TINY = ModelConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, latent_dim=16,
                   intermediate_size=48, num_experts=5, num_shared_experts=1, top_k_experts=2,
                   max_position_embeddings=256)


def random_state(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """A float32 checkpoint with random weights, non-trivial norms and biases, so every parameter matters."""
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in CustomLLM(config).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(shapes.items()):
        scale = 0.3 if len(shape) == 1 else 0.15
        base = 1.0 if len(shape) == 1 and shape[0] == config.hidden_size else 0.0
        state[name] = base + scale * torch.randn(shape, generator=g)
    return state


def random_model(config: ModelConfig, seed: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 **backends: str) -> CustomLLM:
    """`random_state(config, seed)` loaded and processed; `backends`: linear=, attention=, moe= names (or auto)."""
    return load_model(random_state(config, seed), dtype=dtype, device=device, config=config,
                      backends=select_backends(device, dtype, **backends))


@pytest.fixture
def tiny_model() -> CustomLLM:
    return random_model(TINY, 1)


@pytest.fixture
def tiny_state() -> dict[str, torch.Tensor]:
    """The checkpoint tiny_model was loaded from."""
    return random_state(TINY, 1)
