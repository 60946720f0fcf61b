"""Attention on transformers' layout: nn.sdsl's ``attention_bthd`` / ``block_attention_bthd`` (two
batch indices, ``h`` after the token) read ``q``, ``k``, ``v`` as [B, T, H, D] tensors in place and
write the output so; ``sd.attention`` takes that path for [B, H, T, D] views of contiguous [B, T, H,
D] tensors and copies every other layout. Against masked SDPA, both CPU backends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsedsl as sd
from sparsedsl.ir import loop_ir as L
from sparsedsl.ir.lowering import lower
from sparsedsl.runtime import attention as module
from sparsedsl.runtime.ops import nn_program
from tests.kernels.test_attention import SETTINGS, _blocks, _want
from tests.kernels.test_differential import BACKENDS, _close
from tests.models import padded_tiny_bert

FEWER = settings(SETTINGS, max_examples=15)  # each new shape bucket is tuned, each format built


@pytest.fixture(scope="module", params=BACKENDS)
def nn(request):
    return nn_program(backend=request.param)


def _bthd(gen, b: int, n: int, h: int, d: int) -> torch.Tensor:
    return torch.randn(b, n, h, d, generator=gen) * 3


def _reference(q, k, v, mask, scale):
    """``_want`` on [B, T, H, D] tensors: masked SDPA, empty rows zeros."""
    out = _want(*(t.transpose(1, 2) for t in (q, k, v)), mask, scale)
    return out.transpose(1, 2)


@FEWER
@given(
    b=st.integers(1, 3),
    h=st.integers(1, 4),
    t=st.integers(1, 90),
    s=st.integers(1, 80),
    d=st.sampled_from([1, 3, 8, 32, 64]),
    padded=st.floats(0, 1),
    seed=st.integers(0, 2**31 - 1),
)
def test_dense_attention_in_place(nn, b, h, t, s, d, padded, seed):
    """A batch whose keys are all padding (padded near 1) gives zeros."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (_bthd(gen, b, n, h, d) for n in (t, s, s))
    keep = torch.rand(b, s, generator=gen) >= padded
    mask = keep[:, None, None, :].expand(b, h, t, s)
    _close(nn.attention_bthd(q, k, v, keep.float(), d**-0.5), _reference(q, k, v, mask, d**-0.5))


@FEWER
@given(
    blocks=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    sizes=st.sampled_from([(1, 1), (64, 16)]),  # each format a build
    h=st.integers(1, 3),
    d=st.sampled_from([1, 8, 32]),
    density=st.floats(0, 1),
    padded=st.floats(0, 0.5),
    seed=st.integers(0, 2**31 - 1),
)
def test_block_sparse_attention_in_place(nn, blocks, sizes, h, d, density, padded, seed):
    (bq, bk), gen = sizes, torch.Generator().manual_seed(seed)
    t, s = blocks[0] * bq, blocks[1] * bk
    q, k, v = (_bthd(gen, 2, n, h, d) for n in (t, s, s))
    pattern = _blocks(gen, t, s, bq, bk, density)
    keep = torch.rand(2, s, generator=gen) >= padded
    ones = nn.pack(f"BSR({bq}, {bk})", pattern.float())
    ones = ones.with_values(torch.ones_like(ones.values))
    want = _reference(q, k, v, (pattern & keep[:, None, :])[:, None], d**-0.5)
    _close(nn.block_attention_bthd(q, k, v, ones, keep.float(), d**-0.5), want)


LAYOUTS = ["bthd view", "contiguous", "bthd view of a slice", "bhtd view of bthd storage"]


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` [B, H, T, D] with the same values, stored as ``layout`` says."""
    b, h, n, d = x.shape
    if layout == "bthd view":  # what transformers hands over
        return torch.empty(b, n, h, d).copy_(x.transpose(1, 2)).transpose(1, 2)
    if layout == "bthd view of a slice":  # rows of a wider tensor: strided, not compact
        return torch.empty(b, n, h, 2 * d).transpose(1, 2)[..., :d].copy_(x)
    if layout == "bhtd view of bthd storage":  # heads and batch swapped
        return torch.empty(h, b, n, d).copy_(x.transpose(0, 1)).transpose(0, 1)
    return x.contiguous()


def _compact(t: torch.Tensor) -> bool:
    return t.stride() == torch.empty(t.shape).stride()


@FEWER
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 40), st.integers(1, 40)),
    d=st.sampled_from([1, 8, 32]),
    layouts=st.tuples(*[st.sampled_from(LAYOUTS)] * 3),
    padded=st.floats(0, 1),
    masked=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_sd_attention_reads_transformers_views_in_place_and_copies_the_rest(shape, d, layouts, padded, masked, seed):
    (b, h, t, s), gen = shape, torch.Generator().manual_seed(seed)
    if masked:  # whole BSR(16, 16) blocks
        t, s = -(-t // 16) * 16, -(-s // 16) * 16
    q, k, v = (_layout(torch.randn(b, h, n, d, generator=gen), x) for n, x in zip((t, s, s), layouts))
    keep = torch.rand(b, s, generator=gen) >= padded
    pattern = _blocks(gen, t, s, 16, 16, 0.6) if masked else torch.ones(t, s, dtype=torch.bool)
    block = sd.SparseTensor.pack(nn_program().format("BSR(16, 16)"), pattern.float()) if masked else None
    read_in_place = all(_compact(x.transpose(1, 2)) for x in (q, k, v))  # some others are, by size-1 dims
    assert read_in_place or set(layouts) != {"bthd view"}
    assert module.in_place(q, k, v, [block] if masked else []) == read_in_place
    got = module.attention(q, k, v, block_mask=block, key_padding_mask=keep)
    _close(got, _want(q, k, v, (pattern & keep[:, None, :])[:, None], d**-0.5))
    assert _compact(got.transpose(1, 2) if read_in_place else got)  # in place: the kernel's [B, T, H, D] output


def test_batch_indices_fuse_into_one_parallel_loop():
    """b and h: one parallel loop over B * H, taken apart at its top; Q read at [b, t, h, d] into
    its token tile, K and V (strided slices read in place) copied once per (b, h), compact."""
    func = lower(nn_program().kernels["attention_bthd"].kernel)
    loop = func.body
    assert loop.var.name == "b_h" and loop.kind is L.LoopKind.PARALLEL
    assert L.expr_str(loop.extent) == "(B * H)"
    assert [s.var.name for s in loop.body.stmts[:2]] == ["b", "h"]
    reads = [x for x in L.loads(loop.body) if x.buffer.name in ("Q", "K", "V")]
    assert reads and all(r.indices[0] == L.Var("b") and r.indices[2] == L.Var("h") for r in reads)
    assert {b.name for b in L.allocs(loop.body)} >= {"K_b", "V_b", "Q_t"} and "Q_b" not in str(L.allocs(loop.body))
    assert [len([r for r in reads if r.buffer.name == n]) for n in ("K", "V")] == [1, 1]  # the copies only


BATCH_ORDER = """
kernel softmax_{name}(X: f32[B, T, H, S]) -> (Y: f32[B, T, H, S]) {{
    let mx[{first}] = max(j) X[b, t, h, j]
    let z[{first}] = sum(j) exp(X[b, t, h, j] - mx[{first}])
    Y[b, t, h, j] = exp(X[b, t, h, j] - mx[{first}]) / z[{first}]
}}
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_first_statement_names_the_token_any_order_computes_the_same(backend):
    """The token is the first statement's last index that is not a row: mx[b, h, t] tiles t,
    mx[b, t, h] tiles h (batch b, t), mx[t, h, b] tiles b; all are the softmax."""
    orders = {"bht": "b, h, t", "bth": "b, t, h", "thb": "t, h, b"}
    prog = sd.compile("".join(BATCH_ORDER.format(name=n, first=f) for n, f in orders.items()), backend=backend)
    assert [prog.kernels[f"softmax_{n}"].kernel.batch for n in orders] == [("b", "h"), ("b", "t"), ("t", "h")]
    x = torch.randn(2, 5, 3, 7)
    for name in orders:
        _close(getattr(prog, f"softmax_{name}")(x), torch.softmax(x, -1))


def test_transformers_bert_reads_q_k_v_in_place(monkeypatch):
    """A tiny BERT with a padded batch (a sequence of one kept token): every layer's attention runs
    attention_bthd on the views transformers hands over; the attention function returns the
    kernel's [B, T, H, D] output itself, no copy."""
    model, ids, mask, want = padded_tiny_bert(21, (9, 1))
    outputs = []
    kernels = nn_program().kernels
    kernel = kernels[module.DENSE_BTHD]
    monkeypatch.setitem(kernels, module.DENSE_BTHD, lambda *a: outputs.append(kernel(*a)) or outputs[-1])
    model.set_attn_implementation(module.register_transformers())
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (got - want).abs().max() <= 2e-4
    assert len(outputs) == model.config.num_hidden_layers
    q, k, v = (torch.randn(2, 7, 4, 8).transpose(1, 2) for _ in range(3))
    out, _ = module.transformers_attention(torch.nn.Module(), q, k, v, None)
    assert out.data_ptr() == outputs[-1].data_ptr() and out.shape == (2, 7, 4, 8) and out.is_contiguous()
    _close(out, F.scaled_dot_product_attention(q, k, v).transpose(1, 2))


def test_grouped_keys_and_block_padding_stay_in_place(monkeypatch):
    """Grouped keys are repeated, and a block pattern's tokens padded, in [B, T, H, D] storage:
    the kernels still read them in place."""
    seen = []
    in_place = module.in_place
    monkeypatch.setattr(module, "in_place", lambda *a: seen.append(in_place(*a)) or seen[-1])
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 19, 4, 8, generator=gen).transpose(1, 2)
    k, v = (torch.randn(2, 19, 2, 8, generator=gen).transpose(1, 2) for _ in range(2))
    layer = torch.nn.Module()
    out, _ = module.transformers_attention(layer, q, k, v, None)
    want = F.scaled_dot_product_attention(q, *(t.repeat_interleave(2, 1) for t in (k, v)))
    _close(out, want.transpose(1, 2))
    setattr(layer, module.PLAN, module.BlockPattern("BSR(16, 16)", 40))  # every key: 19 tokens padded to 32
    out, _ = module.transformers_attention(layer, q, k, v, None)
    _close(out, want.transpose(1, 2))
    assert seen == [True, True]
