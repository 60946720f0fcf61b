"""Tiny transformers models the tests build (no weights downloaded)."""

from __future__ import annotations

import torch


def padded_tiny_bert(tokens: int, kept: tuple[int, int]):
    """A 2-layer BERT (hidden 64, 4 heads), random ids for a batch of 3 sequences of ``tokens``,
    the second keeping its first ``kept[0]`` tokens and the third its first ``kept[1]`` (the rest
    padding), and its last hidden state on them with transformers' own attention:
    ``(model, ids, mask, want)``."""
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    torch.manual_seed(0)
    model = BertModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (3, tokens))
    mask = torch.ones(3, tokens, dtype=torch.long)
    mask[1, kept[0] :], mask[2, kept[1] :] = 0, 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return model, ids, mask, want
