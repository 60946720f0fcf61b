"""Every kernel, every format, random shapes and sparsities: compared against dense torch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings

import sparsedsl as sd
from tests.strategies import FORMATS, fuzz_examples, prune_to_fit, sparse_case

HERE = Path(__file__).parent
SETTINGS = settings(max_examples=fuzz_examples(20), deadline=None, suppress_health_check=[HealthCheck.too_slow])


BACKENDS = ["tvm", "llvm"]


@pytest.fixture(scope="module", params=BACKENDS)
def prog(request):
    return sd.compile(HERE / "epilogues.sdsl", backend=request.param)


def _case(prog, fmt, n, k, m, sparsity, seed):
    gen = torch.Generator().manual_seed(seed)
    w = prune_to_fit(torch.randn(n, k, generator=gen), prog.format(fmt), sparsity)
    return w, prog.pack(fmt, w), gen


def _close(actual, expected):
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale)


REFERENCES = {
    "plain": lambda x, w, b, r: x @ w.T,
    "bias_relu": lambda x, w, b, r: F.relu(x @ w.T + b),
    "bias_gelu": lambda x, w, b, r: F.gelu(x @ w.T + b),
    "silu": lambda x, w, b, r: F.silu(x @ w.T),
    "scaled_residual": lambda x, w, b, r: 0.75 * (x @ w.T) + r,
}


@pytest.mark.parametrize("kernel", sorted(REFERENCES))
@settings(max_examples=fuzz_examples(12), deadline=None, suppress_health_check=[HealthCheck.too_slow])  # x 5 kernels
@given(case=sparse_case())
def test_linear_epilogues(prog, kernel, case):
    fmt, n, k, m, sparsity, seed = case
    w, W, gen = _case(prog, fmt, n, k, m, sparsity, seed)
    x = torch.randn(m, k, generator=gen)
    b = torch.randn(n, generator=gen)
    r = torch.randn(m, n, generator=gen)
    args = {
        "plain": (x, W),
        "bias_relu": (x, W, b),
        "bias_gelu": (x, W, b),
        "silu": (x, W),
        "scaled_residual": (x, W, 0.75, r),
    }[kernel]
    _close(prog.kernels[kernel](*args), REFERENCES[kernel](x, w, b, r))


@SETTINGS
@given(case=sparse_case())
def test_transposed_product(prog, case):
    fmt, n, k, m, sparsity, seed = case
    w, W, gen = _case(prog, fmt, n, k, m, sparsity, seed)
    g = torch.randn(m, n, generator=gen)
    _close(prog.transposed(g, W), g @ w)


@SETTINGS
@given(case=sparse_case())
def test_sddmm(prog, case):
    fmt, n, k, m, sparsity, seed = case
    w, W, gen = _case(prog, fmt, n, k, m, sparsity, seed)
    a = torch.randn(m, n, generator=gen)
    b = torch.randn(m, k, generator=gen)
    pattern = W.with_values(torch.ones_like(W.values)).to_dense()
    out = prog.sddmm(a, b, W)
    assert out.format == W.format and out.nnz == W.nnz
    _close(out.to_dense(), (a.T @ b) * pattern)
    _close(prog.sddmm_scaled(a, b, W).to_dense(), (a.T @ b) * w)


@SETTINGS
@given(case=sparse_case())
def test_matrix_vector_products(prog, case):
    fmt, n, k, _, sparsity, seed = case
    w, W, gen = _case(prog, fmt, n, k, 1, sparsity, seed)
    x, b, v = torch.randn(k, generator=gen), torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    _close(prog.matvec(W, x, b), F.relu(w @ x + b))
    _close(prog.matvec_t(W, v), w.T @ v)


@SETTINGS
@given(case=sparse_case())
def test_pack_roundtrip(prog, case):
    fmt, n, k, m, sparsity, seed = case
    w, W, _ = _case(prog, fmt, n, k, m, sparsity, seed)
    assert torch.equal(W.to_dense(), w)
    assert W.shape == (n, k)


@pytest.mark.parametrize("fmt", [f for f, _, _ in FORMATS])
@pytest.mark.parametrize("m", [1, 37])
def test_every_format_every_kernel(prog, fmt, m):
    """Deterministic coverage: each format through each kernel at one shape."""
    n, k = 32, 64
    w, W, gen = _case(prog, fmt, n, k, m, 0.7, 1234)
    x, b, r = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen), torch.randn(m, n, generator=gen)
    _close(prog.bias_gelu(x, W, b), F.gelu(x @ w.T + b))
    _close(prog.scaled_residual(x, W, 0.75, r), 0.75 * (x @ w.T) + r)
    g = torch.randn(m, n, generator=gen)
    _close(prog.transposed(g, W), g @ w)
    pattern = W.with_values(torch.ones_like(W.values)).to_dense()
    _close(prog.sddmm(g, x, W).to_dense(), (g.T @ x) * pattern)


@pytest.fixture(scope="module")
def both():
    return [sd.compile(HERE / "epilogues.sdsl", backend=b) for b in BACKENDS]


@SETTINGS
@given(case=sparse_case())
def test_backends_agree(both, case):
    fmt, n, k, m, sparsity, seed = case
    tvm_prog, llvm_prog = both
    w, W, gen = _case(tvm_prog, fmt, n, k, m, sparsity, seed)
    x, b = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen)
    torch.testing.assert_close(tvm_prog.bias_gelu(x, W, b), llvm_prog.bias_gelu(x, W, b), rtol=1e-5, atol=1e-5)
    g = torch.randn(m, n, generator=gen)
    torch.testing.assert_close(tvm_prog.transposed(g, W), llvm_prog.transposed(g, W), rtol=1e-5, atol=1e-5)
