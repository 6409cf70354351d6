import pytest
import torch

from model import CustomLLM, ModelConfig, load_model

TINY = ModelConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, latent_dim=16,
                   intermediate_size=48, num_experts=5, num_shared_experts=1, top_k_experts=2,
                   max_position_embeddings=256)


def randomise(model: CustomLLM, seed: int) -> None:
    """Random weights with non-trivial norms and biases, so every parameter matters in the comparison.

    Loaded through load_state_dict, which re-prepares the model's derived (fused, packed) weights.
    """
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in sorted(model.state_dict().items()):
        scale = 0.3 if t.dim() == 1 else 0.15
        base = 1.0 if t.dim() == 1 and t.shape[0] == model.config.hidden_size else 0.0
        state[name] = (base + scale * torch.randn(t.shape, generator=g)).to(t.dtype)
    model.load_state_dict(state)


@pytest.fixture
def tiny_model() -> CustomLLM:
    model = load_model(None, dtype=torch.float32, config=TINY)
    randomise(model, 1)
    return model
