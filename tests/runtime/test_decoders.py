"""Decoder models: transformers' Conv1D layers (GPT-2 family, weight stored [in, out]) are linear
layers for the rules, and ``generate()`` with a KV cache runs the sparse kernels one token a step."""

from __future__ import annotations

import copy

import pytest
import torch

import sparsedsl as sd

transformers = pytest.importorskip("transformers")


def pruned_dense(sparse_model: torch.nn.Module, dense_model: torch.nn.Module) -> torch.nn.Module:
    """``dense_model`` with the weights its sparse copy stores (Conv1D weights transposed back)."""
    reference = copy.deepcopy(dense_model)
    for name, module in sparse_model.named_modules():
        if isinstance(module, sd.SparseLinear):
            target = reference.get_submodule(name)
            weight = module.sparse_weight().to_dense()
            with torch.no_grad():
                target.weight.copy_(weight.T if type(target).__name__ == "Conv1D" else weight)
    return reference


def test_gpt2_conv1d_layers_are_compiled_and_compute_the_same():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    rules = {"transformer.h.*.mlp.c_fc": ("CSR", 0.5), "transformer.h.*.attn.c_attn": ("BSR(4, 1)", 0.5)}
    sparse = sd.compile_model(model, rules)
    names = [row.layer for row in sd.report(sparse) if row.sparse]
    assert names == [f"transformer.h.{i}.{layer}" for i in range(2) for layer in ("attn.c_attn", "mlp.c_fc")]
    ids = torch.randint(0, 128, (2, 9))
    with torch.inference_mode():
        torch.testing.assert_close(sparse(ids).logits, pruned_dense(sparse, model)(ids).logits, rtol=1e-4, atol=1e-4)


def test_unmatched_conv1d_rule_names_what_it_matched():
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    with pytest.raises(sd.SdslSemanticError, match="transformers' Conv1D"):
        sd.compile_model(transformers.GPT2LMHeadModel(config), {"transformer.h.0.ln_1": "CSR"})


def test_llama_generate_runs_the_sparse_kernels_one_token_a_step(tiny_llama):
    model = tiny_llama
    sparse = sd.compile_model(
        model, {"model.layers.*.mlp.*_proj": ("NM(2, 4)", 0.5), "*.self_attn.o_proj": ("CSR", 0.5)}
    )
    tokens: list[int] = []
    hooks = [
        m.register_forward_pre_hook(lambda _, args: tokens.append(args[0].shape[-2]))
        for m in sparse.modules()
        if isinstance(m, sd.SparseLinear)
    ]
    ids = torch.randint(0, 128, (1, 6))
    with torch.inference_mode():
        out = sparse.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        expected = pruned_dense(sparse, model).generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for hook in hooks:
        hook.remove()
    assert torch.equal(out, expected)
    layers = sum(isinstance(m, sd.SparseLinear) for m in sparse.modules())
    assert tokens[:layers] == [6] * layers and tokens[layers:] == [1] * (layers * 4)
