"""Kernels that once computed wrong numbers or read out of bounds; each now runs right or is a
clear error before anything runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsedsl as sd

DCSR = "format DCSR = (i, j) -> (i: compressed, j: compressed)\n"


@pytest.mark.parametrize("backend", ["tvm", "llvm"])
def test_rows_absent_from_the_pattern_are_written(backend):
    prog = sd.compile(
        DCSR
        + """
kernel lin(X: f32[M, K], W: f32[N, K] @ DCSR, b: f32[N]) -> (Y: f32[M, N]) {
    Y[m, n] = sum(k) X[m, k] * W[n, k] + b[n]
}""",
        backend=backend,
    )
    w = torch.randn(16, 8)
    w[3:9] = 0  # whole rows missing from the compressed row level
    x, b = torch.randn(70, 8), torch.randn(16)
    torch.testing.assert_close(prog.lin(x, prog.pack("DCSR", w), b), x @ w.T + b, rtol=1e-4, atol=1e-5)


def test_dense_output_without_a_sum_is_an_error():
    with pytest.raises(sd.SdslSemanticError, match="make the output sparse") as info:  # by check, before any call
        sd.compile("""
kernel scale(W: f32[N, K] @ CSR, a: f32) -> (Y: f32[N, K]) {
    Y[n, k] = W[n, k] * a
}""")
    assert info.value.span.line == 3 and info.value.span.column == 15  # at the read of W


def test_reading_the_output_is_an_error():
    with pytest.raises(sd.SdslSemanticError, match="cannot be read"):
        sd.compile("""
kernel acc(X: f32[M, K], W: f32[N, K] @ CSR) -> (Y: f32[M, N]) {
    Y[m, n] = sum(k) X[m, k] * W[n, k] + Y[m, n]
}""")


def test_sparse_output_has_the_shape_of_its_pattern():
    with pytest.raises(sd.SdslSemanticError, match="has the shape of its pattern"):
        sd.compile("""
kernel g(A: f32[M, N], B: f32[M, K], W: f32[N, K] @ CSR) -> (D: f32[K, N] @ W) {
    D[k, n] = sum(m) A[m, n] * B[m, k]
}""")


@pytest.mark.parametrize("backend", ["tvm", "llvm"])
def test_partial_tile_residual_is_read_in_bounds(backend):
    prog = sd.compile(
        """
kernel res(X: f32[M, K], W: f32[N, K] @ BSR(4, 1), b: f32[N], R: f32[M, N]) -> (Y: f32[M, N]) {
    Y[m, n] = sum(k) X[m, k] * W[n, k] + b[n] + R[m, n]
}""",
        backend=backend,
    )
    w = sd.prune(torch.randn(32, 16), "BSR(4, 1)", 0.5)
    for m in (1, 17, 65):
        x, b = torch.randn(m, 16), torch.randn(32)
        # the residual ends exactly at a page-free boundary of its own allocation
        r = torch.randn(m, 32)
        torch.testing.assert_close(prog.res(x, prog.pack("BSR(4, 1)", w), b, r), x @ w.T + b + r, rtol=1e-4, atol=1e-5)


def test_tile_names_the_token_index():
    with pytest.raises(sd.ScheduleError, match="cannot tile 'k'"):
        sd.compile("""
kernel lin(X: f32[M, K], W: f32[N, K] @ CSR) -> (Y: f32[M, N]) {
    Y[m, n] = sum(k) X[m, k] * W[n, k]
}
schedule lin on cpu { tile k by 32 }""")


@pytest.mark.parametrize("fmt", ["CSR", "BSR(4, 1)", "COO", "CSC"])
def test_sddmm_runs_parallel_over_rows(fmt):
    prog = sd.compile("""
kernel g(A: f32[M, N], B: f32[M, K], W: f32[N, K] @ CSR) -> (D: f32[N, K] @ W) {
    D[n, k] = sum(m) A[m, n] * B[m, k]
}""")
    assert "parallel" in prog.g.source("ir", fmt)


def test_kernel_call_shape_must_fit_the_layer():
    rules = """
kernel lin(X: f32[M, K], W: f32[N, K] @ CSR, b: f32[N]) -> (Y: f32[M, N]) {
    Y[m, n] = sum(k) X[m, k] * W[n, k] + b[n]
}
model m { linear "*" use lin sparsity 0.5 }
"""
    with pytest.raises(sd.ArgumentError, match="layer '0'.*has no bias"):
        sd.compile_model(nn.Sequential(nn.Linear(8, 8, bias=False)), rules)


@pytest.mark.parametrize("backend", ["tvm", "llvm"])
@pytest.mark.parametrize("func", ["exp", "sigmoid", "tanh", "silu", "gelu"])
def test_transcendental_epilogues_are_accurate(backend, func):
    """exp, erf and friends are polynomial approximations that vectorise: check them over a wide range."""
    prog = sd.compile(
        "kernel f(X: f32[M, K], W: f32[N, K] @ CSR) -> (Y: f32[M, N]) {"
        f" Y[m, n] = {func}(sum(k) X[m, k] * W[n, k]) }}",
        backend=backend,
    )
    x = torch.linspace(-12, 12, 2001).reshape(-1, 1)  # one input column: the sum is exact
    w = torch.ones(1, 1)
    reference = getattr(torch, func, None) or getattr(torch.nn.functional, func)
    expected = reference(x.double()).float()
    torch.testing.assert_close(
        prog.f(x, prog.pack("CSR", w)), expected, rtol=2e-6 if func != "exp" else 1e-5, atol=1e-6
    )
