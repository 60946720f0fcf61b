"""Fixtures shared by the runtime tests."""

import pytest
import torch


@pytest.fixture
def tiny_llama():
    """A 2-layer Llama with grouped keys (4 query heads, 2 key-value heads) in eval mode, made
    right after ``torch.manual_seed(0)`` (a test's later draws follow from that seed)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()
