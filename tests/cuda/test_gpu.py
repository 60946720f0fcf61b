"""Differential tests on a CUDA GPU: every kernel of gpu_cases, every prelude format, f32 / f16 /
bf16, random shapes and sparsities, against dense torch on the same (rounded) operands. They skip
cleanly on a machine without a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsedsl as sd
from tests.cuda.gpu_cases import (
    DTYPES,
    KERNELS,
    MODEL_FORMATS,
    STAGED,
    TENSOR_CORES,
    TENSOR_CORES_NM,
    VECTOR_TOKENS,
    WARP_THREADS,
    program,
    staged_source,
    tensor_core_source,
    vector_source,
    warp_schedule,
)
from tests.strategies import FORMATS, prune_to_fit, sparse_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOLERANCE = {"f32": 1e-4, "f16": 4e-3, "bf16": 3e-2}  # relative error in the 2-norm


@pytest.fixture(scope="module", params=list(DTYPES))
def prog(request):
    p = program(request.param)
    p.dtype_name = request.param
    return p


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: str) -> None:
    """‖actual − expected‖ / ‖expected‖ under the dtype's tolerance (f32: gelu's erf polynomial);
    nothing NaN."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert torch.isfinite(actual).all(), "non-finite output"
    err = (actual - expected).norm() / max(expected.norm().item(), 1e-6)
    assert err < TOLERANCE[dtype], f"relative error {err:.2e} ({dtype})"


def _operands(prog, fmt, n, k, m, sparsity, seed):
    """The pruned weight (dense, rounded to the dtype, float32) and its packed CUDA form, and a
    generator of random CUDA operands whose float32 twins are the reference's inputs."""
    dtype = DTYPES[prog.dtype_name]
    gen = torch.Generator().manual_seed(seed)
    w = prune_to_fit(torch.randn(n, k, generator=gen), prog.format(fmt), sparsity).to(dtype)
    W = prog.pack(fmt, w).cuda()

    def rand(*shape):
        t = torch.randn(*shape, generator=gen).to(dtype)
        return t.cuda(), t.float()

    return w.float(), W, rand


def _run(prog, kernel, fmt, n, k, m, sparsity, seed):
    w, W, rand = _operands(prog, fmt, n, k, m, sparsity, seed)
    x, xf = rand(m, k)
    b, bf = rand(n)
    r, rf = rand(m, n)
    g, gf = rand(m, n)
    v, vf = rand(k)
    u, uf = rand(n)
    pattern = W.cpu().with_values(torch.ones(W.nnz)).to_dense()
    cases = {
        "plain": (lambda: prog.plain(x, W), lambda: xf @ w.T),
        "bias_gelu": (lambda: prog.bias_gelu(x, W, b), lambda: F.gelu(xf @ w.T + bf)),
        "scaled_residual": (lambda: prog.scaled_residual(x, W, 0.75, r), lambda: 0.75 * (xf @ w.T) + rf),
        "transposed": (lambda: prog.transposed(g, W), lambda: gf @ w),
        "sddmm": (lambda: prog.sddmm(g, x, W).cpu().to_dense(), lambda: (gf.T @ xf) * pattern),
        "sddmm_scaled": (lambda: prog.sddmm_scaled(g, x, W).cpu().to_dense(), lambda: (gf.T @ xf) * w),
        "matvec": (lambda: prog.matvec(W, v, b), lambda: F.relu(w @ vf + bf)),
        "matvec_t": (lambda: prog.matvec_t(W, u), lambda: w.T @ uf),
    }
    actual, expected = cases[kernel]
    _close(actual(), expected(), prog.dtype_name)


@pytest.mark.parametrize("kernel", sorted({k for names in KERNELS.values() for k in names}))
@SETTINGS
@given(case=sparse_case(), data=st.data())
def test_kernels_match_dense_on_the_gpu(prog, kernel, case, data):
    if kernel not in KERNELS[prog.dtype_name]:
        pytest.skip(f"{kernel} is tested in f32 only")
    _run(prog, kernel, *case)


@pytest.mark.parametrize("fmt", [f for f, _, _ in FORMATS])
def test_every_format_at_a_size_with_many_blocks(prog, fmt):
    rows, cols = next((r, c) for f, r, c in FORMATS if f == fmt)
    n, k = 16 * rows * (8 // rows or 1), 64 * cols
    for kernel in KERNELS[prog.dtype_name]:
        _run(prog, kernel, fmt, n, k, 301, 0.8, 7)


def test_cpu_weights_are_refused_before_running():
    prog = program("f32")
    W = prog.pack("CSR", sd.prune(torch.randn(8, 8), "CSR", 0.5))
    with pytest.raises(sd.ArgumentError, match="W.to"):
        prog.plain(torch.randn(2, 8, device="cuda"), W)


def test_compile_model_runs_on_the_gpu():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    sparse = sd.compile_model(model, {"0": (MODEL_FORMATS[0], 0.5), "2": (MODEL_FORMATS[1], 0.5)}, target="cuda").cuda()
    ref = torch.nn.Sequential(sparse[0].to_dense(), torch.nn.ReLU(), sparse[2].to_dense())
    x = torch.randn(3, 16, device="cuda", requires_grad=True)
    y = sparse(x)
    torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-4)
    y.sum().backward()
    assert x.grad is not None and x.grad.device.type == "cuda"


def test_compiled_model_under_torch_compile_on_the_gpu():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    sparse = sd.compile_model(model, {"0": (MODEL_FORMATS[0], 0.5), "2": (MODEL_FORMATS[1], 0.5)}, target="cuda").cuda()
    compiled = torch.compile(sparse, fullgraph=True)
    x = torch.randn(5, 16, device="cuda")
    torch.testing.assert_close(compiled(x), sparse(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt, linear_loop, transposed_loop", STAGED)
@pytest.mark.parametrize("m", [1, 301])
def test_staged_kernels_on_the_gpu(fmt, linear_loop, transposed_loop, m):
    prog = sd.compile(staged_source(fmt, linear_loop, transposed_loop), target="cuda")
    prog.dtype_name = "f32"
    w, W, rand = _operands(prog, fmt, 64, 128, m, 0.8, m)
    x, xf = rand(m, 128)
    b, bf = rand(64)
    g, gf = rand(m, 64)
    _close(prog.lin(x, W, b), F.gelu(xf @ w.T + bf), "f32")
    _close(prog.tr(g, W), gf @ w, "f32")


@pytest.mark.parametrize("threads", WARP_THREADS)
def test_cross_thread_sums_on_the_gpu(threads):
    prog = sd.compile(warp_schedule(threads), target="cuda")
    prog.dtype_name = "f32"
    w, S, rand = _operands(prog, "CSR", 48, 80, 1000, 0.7, threads)
    a, af = rand(1000, 48)
    b, bf = rand(1000, 80)
    pattern = S.cpu().with_values(torch.ones(S.nnz)).to_dense()
    _close(prog.sddmm(a, b, S).cpu().to_dense(), (af.T @ bf) * pattern, "f32")


@pytest.mark.parametrize("fmt, dtype, tile", TENSOR_CORES + TENSOR_CORES_NM)
@pytest.mark.parametrize("m", [1, 64, 256, 301])
def test_tensor_cores_on_the_gpu(fmt, dtype, tile, m):
    prog = sd.compile(tensor_core_source(fmt, dtype, tile), target="cuda")
    prog.dtype_name = dtype
    w, W, rand = _operands(prog, fmt, 128, 256, m, 0.7, m)
    x, xf = rand(m, 256)
    b, bf = rand(128)
    _close(prog.lin(x, W, b), F.gelu(xf @ w.T + bf), dtype)


@pytest.mark.parametrize("fmt, dtype", VECTOR_TOKENS)
@pytest.mark.parametrize("m", [1, 130, 301])
def test_vector_tokens_on_the_gpu(fmt, dtype, m):
    prog = sd.compile(vector_source(fmt, dtype), target="cuda")
    prog.dtype_name = dtype
    w, W, rand = _operands(prog, fmt, 64, 128, m, 0.7, m)
    x, xf = rand(m, 128)
    b, bf = rand(64)
    _close(prog.lin(x, W, b), F.gelu(xf @ w.T + bf), dtype)
