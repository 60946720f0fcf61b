"""Pointwise kernels (one statement, no sum, dense inputs: ``lowering._Pointwise``) against torch
over shapes on both CPU backends: vector blocks and the scalar tail, broadcasts, scalars, three
dimensions, and the rounding and saturation of a float stored to int8."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsedsl as sd
from sparsedsl.ir import loop_ir as L
from sparsedsl.ir.lowering import POINTWISE_LANES
from sparsedsl.ir.schedule import loops
from tests.kernels.test_differential import BACKENDS

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOURCE = """
kernel quantize(X: f32[M, K], inv_scale: f32[M]) -> (Q: i8[M, K]) {
    Q[m, k] = X[m, k] * inv_scale[m]
}
kernel axpy(X: f32[M, K], Y: f32[M, K], b: f32[K], a: f32) -> (Z: f32[M, K]) {
    Z[m, k] = a * X[m, k] + relu(Y[m, k]) - b[k]
}
kernel scale3(X: f32[B, T, D], s: f32[B]) -> (Z: f32[B, T, D]) {
    Z[b, t, d] = X[b, t, d] * s[b]
}
"""


@pytest.fixture(scope="module", params=BACKENDS)
def prog(request):
    return sd.compile(SOURCE, backend=request.param)


def test_a_pointwise_kernel_reads_in_place_in_vectors():
    func = next(iter(sd.compile(SOURCE).quantize.lowered(None).values()))
    stmts = L.leaves(func.body)
    assert not any(isinstance(s, L.Alloc) for s in stmts)  # nothing staged, no tile written back
    vectors = [f for f in loops(func.body) if f.kind is L.LoopKind.VECTORIZED]
    assert [f.extent for f in vectors] == [L.const(POINTWISE_LANES)]
    assert func.meta["mode"] == "pointwise"


@SETTINGS
@given(m=st.integers(1, 70), k=st.integers(1, 80), seed=st.integers(0, 2**31 - 1))
def test_quantize_rounds_to_even_and_saturates(prog, m, k, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * 3
    x[0, 0] = 2.5  # a tie: to even
    inv = torch.rand(m, generator=gen) * 100
    inv[0] = 1.0
    reference = torch.clamp(torch.round(x * inv[:, None]), -128, 127).to(torch.int8)
    assert torch.equal(prog.quantize(x, inv), reference)


@SETTINGS
@given(m=st.integers(1, 40), k=st.integers(1, 80), a=st.floats(-3, 3), seed=st.integers(0, 2**31 - 1))
def test_broadcasts_and_scalars(prog, m, k, a, seed):
    gen = torch.Generator().manual_seed(seed)
    x, y, b = torch.randn(m, k, generator=gen), torch.randn(m, k, generator=gen), torch.randn(k, generator=gen)
    torch.testing.assert_close(prog.axpy(x, y, b, a), a * x + torch.relu(y) - b)


@SETTINGS
@given(b=st.integers(1, 5), t=st.integers(1, 9), d=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_three_dimensions(prog, b, t, d, seed):
    gen = torch.Generator().manual_seed(seed)
    x, s = torch.randn(b, t, d, generator=gen), torch.randn(b, generator=gen)
    torch.testing.assert_close(prog.scale3(x, s), x * s[:, None, None])
