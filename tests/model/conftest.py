import pytest
import torch

from model import CustomLLM, ModelConfig, load_model

TINY = ModelConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, latent_dim=16,
                   intermediate_size=48, num_experts=5, num_shared_experts=1, top_k_experts=2,
                   max_position_embeddings=256)


def randomise(model: CustomLLM, seed: int) -> None:
    """Random weights with non-trivial norms and biases, so every parameter matters in the comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in sorted(model.state_dict().items()):
            scale = 0.3 if t.dim() == 1 else 0.15
            base = 1.0 if t.dim() == 1 and t.shape[0] == model.config.hidden_size else 0.0
            t.copy_(base + scale * torch.randn(t.shape, generator=g))


@pytest.fixture
def tiny_model() -> CustomLLM:
    model = load_model(None, dtype=torch.float32, config=TINY)
    randomise(model, 1)
    return model
