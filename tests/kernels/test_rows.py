"""Row-wise kernels (intermediates, sum and max over the output row: layer norm, softmax, RMS
norm) against dense torch, over formats, shapes and sparsities, on both CPU backends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import sparsedsl as sd
from sparsedsl.errors import BackendError
from sparsedsl.ir import loop_ir as L
from sparsedsl.ir.lowering import LowerOptions, lower
from tests.kernels.test_differential import BACKENDS, _case, _close
from tests.strategies import fuzz_examples, sparse_case

HERE = Path(__file__).parent
SETTINGS = settings(max_examples=fuzz_examples(12), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", params=BACKENDS)
def prog(request):
    return sd.compile(HERE / "rows.sdsl", backend=request.param)


def _softmax_rows(h):
    return torch.softmax(h, dim=-1)


@SETTINGS
@given(case=sparse_case(), eps=st.sampled_from([1e-12, 1e-5, 0.1]))
def test_layer_norm_of_linear_bias_residual(prog, case, eps):
    fmt, n, k, m, sparsity, seed = case
    w, W, gen = _case(prog, fmt, n, k, m, sparsity, seed)
    x, b, r = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen), torch.randn(m, n, generator=gen)
    gamma, beta = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    want = F.layer_norm(F.linear(x, w, b) + r, (n,), gamma, beta, eps)
    _close(prog.layer_norm(x, W, b, r, gamma, beta, eps), want)


@SETTINGS
@given(case=sparse_case())
@example(case=("NM(2, 8)", 1, 56, 1, 0.0, 3534))  # one row near -5: gelu's error times rstd = 1000
def test_softmax_and_rms_norm_of_linear(prog, case):
    fmt, n, k, m, sparsity, seed = case
    w, W, gen = _case(prog, fmt, n, k, m, sparsity, seed)
    x, g = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen)
    _close(prog.linear_softmax(x, W), _softmax_rows(x @ w.T))
    h = F.gelu(x @ w.T)
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    # rstd multiplies the kernel's gelu error (an erf polynomial: up to ~1e-6 absolute, where gelu
    # is nearly 0 for inputs near -5) by up to 1000 in a row whose values are all that small (n = 1)
    gelu_error = 1e-6 * (rstd * g.abs()).max().item()
    torch.testing.assert_close(prog.rms_norm(x, W, g), h * rstd * g, rtol=1e-4, atol=1e-4 + gelu_error)


@SETTINGS
@given(m=st.integers(1, 150), n=st.integers(1, 90), scale=st.floats(-3, 3), seed=st.integers(0, 2**31 - 1))
def test_dense_row_kernels(prog, m, n, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(m, n, generator=gen) * 10
    _close(prog.softmax(s), _softmax_rows(s))
    _close(prog.row_max(s, scale), s * scale - (s * scale).max(-1, keepdim=True).values)
    d = torch.randn(n, 24, generator=gen)
    x = torch.randn(m, 24, generator=gen)
    h = x @ d.T
    _close(prog.dense_layer_norm(x, d), h - h.mean(-1, keepdim=True))


def test_large_rows_and_many_tiles(prog):
    """Rows wider than a tile's worth of registers and more tiles than threads."""
    gen = torch.Generator().manual_seed(3)
    w, W, _ = _case(prog, "BSR(4, 1)", 384, 1536, 300, 0.9, 7)
    x, r = torch.randn(300, 1536, generator=gen), torch.randn(300, 384, generator=gen)
    b = torch.randn(384, generator=gen)
    gamma, beta = torch.randn(384, generator=gen), torch.randn(384, generator=gen)
    want = F.layer_norm(F.linear(x, w, b) + r, (384,), gamma, beta, 1e-12)
    _close(prog.layer_norm(x, W, b, r, gamma, beta, 1e-12), want)


def test_intermediates_live_in_tile_buffers():
    """The rows of H, the row statistics and e are token-tile buffers, never [M, N] tensors."""
    kernel = sd.compile(HERE / "rows.sdsl").kernels["linear_softmax"]
    func = lower(kernel.kernel.with_format(kernel.program.format("BSR(4, 1)")), LowerOptions(tile=16))
    shapes = {b.name: b.shape for b in L.allocs(func.body)}
    assert shapes["Y_t"] == (L.SizeVar("N"), L.const(16))  # H: the product's output tile
    assert shapes["mx_t"] == shapes["z_t"] == (L.const(16),)
    assert shapes["e_t"] == (L.SizeVar("N"), L.const(16))
    assert [p.name for p in func.params if isinstance(p, L.Buffer)][-1] == "Y"


def test_gpu_refuses_row_wise_kernels_by_name():
    kernel = sd.compile(HERE / "rows.sdsl").kernels["layer_norm"].kernel
    with pytest.raises(BackendError, match="no GPU mapping of row-wise kernels"):
        lower(kernel, LowerOptions(gpu=True))
