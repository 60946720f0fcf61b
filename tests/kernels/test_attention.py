"""Attention written in the language (sparsedsl/nn.sdsl's ``attention`` and ``block_attention``)
and ``sd.attention`` against ``F.scaled_dot_product_attention`` with the boolean mask that the
block pattern and the key padding give, a row with no key to attend to giving zeros; both CPU
backends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsedsl as sd
from sparsedsl.errors import ArgumentError, BackendError, SdslSemanticError
from sparsedsl.ir import loop_ir as L
from sparsedsl.ir.lowering import LowerOptions, lower
from sparsedsl.runtime.attention import attention
from sparsedsl.runtime.ops import nn_program
from tests.kernels.test_differential import BACKENDS, _close
from tests.models import padded_tiny_bert
from tests.strategies import fuzz_examples

SETTINGS = settings(max_examples=fuzz_examples(12), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", params=BACKENDS)
def nn(request):
    return nn_program(backend=request.param)


def _want(q, k, v, mask, scale):
    """Masked SDPA, a query row with no key giving zeros."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return torch.where(mask.any(-1, keepdim=True), out, torch.zeros(()))


def _blocks(gen, tokens: int, keys: int, bq: int, bk: int, density: float) -> torch.Tensor:
    """A random block pattern, as a [tokens, keys] bool mask."""
    blocks = torch.rand(tokens // bq, keys // bk, generator=gen) < density
    return blocks.repeat_interleave(bq, 0).repeat_interleave(bk, 1)


@SETTINGS
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 150),
    s=st.integers(1, 140),
    d=st.sampled_from([1, 3, 8, 32, 64]),
    padded=st.floats(0, 1),
    seed=st.integers(0, 2**31 - 1),
)
def test_dense_attention_with_padding(nn, b, t, s, d, padded, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, d, generator=gen) * 3 for n in (t, s, s))
    keep = torch.rand(b, s, generator=gen) >= padded
    scale = d**-0.5
    want = _want(q, k, v, keep[:, None, :].expand(b, t, s), scale)
    _close(nn.attention(q, k, v, keep.float(), scale), want)


@SETTINGS
@given(
    blocks=st.tuples(st.integers(1, 4), st.integers(1, 5)),
    sizes=st.tuples(st.sampled_from([1, 4, 16, 64]), st.sampled_from([1, 4, 16, 64])),
    d=st.sampled_from([1, 8, 32]),
    density=st.floats(0, 1),
    padded=st.floats(0, 0.5),
    seed=st.integers(0, 2**31 - 1),
)
def test_block_sparse_attention(nn, blocks, sizes, d, density, padded, seed):
    """Only the stored blocks are attended to; empty block rows (and rows whose keys are all
    padding) give zeros; the mask's values do not weigh (it is packed from a 0/1 tensor with
    zeros inside partly stored blocks too)."""
    (bq, bk), gen = sizes, torch.Generator().manual_seed(seed)
    t, s = blocks[0] * bq, blocks[1] * bk
    q, k, v = (torch.randn(2, n, d, generator=gen) * 3 for n in (t, s, s))
    pattern = _blocks(gen, t, s, bq, bk, density)
    keep = torch.rand(2, s, generator=gen) >= padded
    mask = nn.pack(f"BSR({bq}, {bk})", pattern.float())
    want = _want(q, k, v, pattern & keep[:, None, :], d**-0.5)
    ones = mask.with_values(torch.ones_like(mask.values))
    _close(nn.block_attention(q, k, v, ones, keep.float(), d**-0.5), want)


def test_token_wise_masks(nn):
    """A mask storing single tokens (CSR): a tile of one token."""
    gen = torch.Generator().manual_seed(5)
    pattern = torch.zeros(9, 12, dtype=torch.bool)
    for row in range(8):  # the last row attends to nothing
        pattern[row, torch.randperm(12, generator=gen)[:3]] = True
    q, k, v = (torch.randn(1, n, 8, generator=gen) for n in (9, 12, 12))
    mask = nn.pack("CSR", pattern.float())
    _close(nn.block_attention(q, k, v, mask, torch.ones(1, 12), 0.5), _want(q, k, v, pattern, 0.5))


def test_mask_formats_that_do_not_store_token_blocks_are_refused(nn):
    mask = nn.pack("CSC", torch.ones(8, 8))
    with pytest.raises(SdslSemanticError, match="must store the token 't' as 't / b: dense' first"):
        q = torch.randn(1, 8, 4)
        nn.block_attention(q, q, q, mask, torch.ones(1, 8), 1.0)


def test_gpu_refuses_attention():
    kernel = nn_program().kernels["attention"].kernel
    with pytest.raises(BackendError, match="no GPU mapping of row-wise kernels"):
        lower(kernel, LowerOptions(gpu=True))


def test_scores_live_in_the_tile():
    """s and e are [S, tile] buffers, never [T, S] tensors."""
    func = lower(nn_program().kernels["attention"].kernel)
    text = repr(func.body)
    assert "name='s_t'" not in text  # the first statement's rows are the nest's output tile
    assert "Buffer(name='e_t', dtype='float32', shape=(SizeVar(name='S', dtype='int64'), Const(value=64" in text


def test_batched_kernels_loop_over_the_batch_in_parallel():
    """One call for every batch and head: the batch loop is the parallel one, the tiles inside."""
    func = lower(nn_program().kernels["attention"].kernel)
    assert func.body.var.name == "b" and func.body.kind is L.LoopKind.PARALLEL
    assert "Buffer(name='Q', dtype='float32', shape=(SizeVar(name='B'" in repr(func.params)


@pytest.mark.parametrize("heads_masks", [False, True])
def test_sd_attention_matches_masked_sdpa(heads_masks):
    gen = torch.Generator().manual_seed(1)
    b, h, t, s, d = 2, 3, 32, 48, 16
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for n in (t, s, s))
    padding = torch.rand(b, s, generator=gen) < 0.8
    padding[1] = False  # a batch with no key at all: zeros
    patterns = [_blocks(gen, t, s, 16, 16, 0.6) for _ in range(h if heads_masks else 1)]
    masks = [sd.SparseTensor.pack(nn_program().format("BSR(16, 16)"), p.float()) for p in patterns]
    dense_mask = torch.stack(patterns)[None] & padding[:, None, None, :]
    got = attention(q, k, v, block_mask=masks if heads_masks else masks[0], key_padding_mask=padding)
    _close(got, _want(q, k, v, dense_mask, d**-0.5))
    _close(attention(q, k, v, scale=0.3), F.scaled_dot_product_attention(q, k, v, scale=0.3))


def test_sd_attention_under_torch_compile_and_no_backward():
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    compiled = torch.compile(lambda q, k, v: attention(q, k, v) * 2, fullgraph=True)
    _close(compiled(q, k, v), F.scaled_dot_product_attention(q, k, v) * 2)
    q.requires_grad_(True)
    with pytest.raises(BackendError, match="sd.attention has no backward yet"):
        attention(q, k, v).sum().backward()


def test_sd_attention_refuses_misfits():
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(ArgumentError, match="float32 on the CPU"):
        attention(q.double(), q.double(), q.double())
    with pytest.raises(ArgumentError, match=r"must be \[B, H, T, D\]"):
        attention(q, q[:, :1], q[:, :1])
    with pytest.raises(ArgumentError, match="key_padding_mask must be a bool tensor"):
        attention(q, q, q, key_padding_mask=torch.ones(1, 16))
    mask = sd.SparseTensor.pack(nn_program().format("BSR(8, 8)"), torch.ones(16, 8))
    with pytest.raises(ArgumentError, match=r"block_mask has shape \[16, 8\], expected \[T, S\] = \[16, 16\]"):
        attention(q, q, q, block_mask=mask)


def test_transformers_models_select_it_by_name(monkeypatch):
    """BERT with attn_implementation "sdsl" computes as with "sdpa", a padded batch included, every
    layer through sd.attention; a causal (decoder) call goes to SDPA."""
    from sparsedsl.runtime import attention as module

    model, ids, mask, want = padded_tiny_bert(17, (9, 3))
    calls = []
    monkeypatch.setattr(module, "attention", lambda *a, **k: calls.append(1) or attention(*a, **k))
    model.set_attn_implementation(module.register_transformers())
    with torch.no_grad():
        _close(model(input_ids=ids, attention_mask=mask).last_hidden_state, want)
    assert len(calls) == model.config.num_hidden_layers
    q = torch.randn(1, 2, 5, 8)
    causal = torch.nn.Module()
    causal.is_causal = True
    out, _ = module.transformers_attention(causal, q, q, q, None)
    _close(out, F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2))
    assert len(calls) == model.config.num_hidden_layers
