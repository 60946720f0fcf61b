"""K-blocking (``block k by kc``): every format whose first summed level is affine in ``k``, against
dense torch on both CPU backends, with blocks small enough that a row's sum spans several; the
default's choice; and the refusals, located."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsedsl as sd
from sparsedsl.ir.loop_ir import func_str
from tests.strategies import fuzz_examples, prune_to_fit

KERNELS = """
format VNM = (i, j) -> (i / 4: dense, j / 4: dense, j % 4: nm(2, 4), i % 4: dense)
format DENSE4 = (i, j) -> (i: dense, j / 4: dense, j % 4: dense)
kernel bias_gelu(X: f32[M, K], W: f32[N, K] @ NM(2, 4), b: f32[N]) -> (Y: f32[M, N]) {
    Y[m, n] = gelu(sum(k) X[m, k] * W[n, k] + b[n])
}
kernel scaled_residual(X: f32[M, K], W: f32[N, K] @ NM(2, 4), alpha: f32, R: f32[M, N]) -> (Y: f32[M, N]) {
    Y[m, n] = alpha * sum(k) X[m, k] * W[n, k] + R[m, n]
}
kernel layernorm(X: f32[M, K], W: f32[N, K] @ NM(2, 4), b: f32[N], gamma: f32[N], beta: f32[N]) -> (Y: f32[M, N]) {
    let H[m, n] = sum(k) X[m, k] * W[n, k] + b[n]
    let mean[m] = (sum(n) H[m, n]) / N
    let var[m] = (sum(n) (H[m, n] - mean[m]) * (H[m, n] - mean[m])) / N
    Y[m, n] = (H[m, n] - mean[m]) / sqrt(var[m] + 0.00001) * gamma[n] + beta[n]
}
"""

# (format, row multiple, column multiple): N:M, vector-wise N:M (a block row of 4 in the
# accumulator) and a dense level over k / 4: the levels whose positions are affine in k. Blocks of
# 8 or 24 values of k: K up to 64 spans up to 8 blocks.
BLOCKABLE = [("NM(2, 4)", 1, 4), ("NM(1, 4)", 1, 4), ("NM(2, 8)", 1, 8), ("VNM", 4, 4), ("DENSE4", 1, 4)]
SETTINGS = settings(max_examples=fuzz_examples(6), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _schedules(size: int, tile: int | None) -> str:
    tiled = f"tile m by {tile}; " if tile else ""
    return "".join(
        f"schedule {k} on cpu {{ {tiled}block k by {size} }}\n" for k in ("bias_gelu", "scaled_residual", "layernorm")
    )


# each backend with each block size, one of them under a 16-token tile
@pytest.fixture(scope="module", params=[("tvm", 8, None), ("tvm", 24, 16), ("llvm", 8, 16), ("llvm", 24, None)])
def prog(request):
    backend, size, tile = request.param
    return sd.compile(KERNELS + _schedules(size, tile), backend=backend)


@st.composite
def blockable_case(draw):
    fmt, rows, cols = draw(st.sampled_from(BLOCKABLE))
    if fmt == "NM(2, 8)":
        cols = 8
    n = rows * draw(st.integers(1, max(1, 40 // rows)))
    k = cols * draw(st.integers(1, 64 // cols))
    m = draw(st.one_of(st.just(1), st.integers(1, 70)))
    return fmt, n, k, m, draw(st.integers(0, 2**31 - 1))


def _layernorm(h: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(h, (h.shape[-1],), gamma, beta, eps=1e-5)


@SETTINGS
@given(case=blockable_case())
def test_blocked_sums_match_dense(prog, case):
    fmt, n, k, m, seed = case
    gen = torch.Generator().manual_seed(seed)
    w = prune_to_fit(torch.randn(n, k, generator=gen), prog.format(fmt), None)
    W = prog.pack(fmt, w)
    x, b, r = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen), torch.randn(m, n, generator=gen)
    gamma, beta = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    dense = x @ w.T
    expected = {
        "bias_gelu": F.gelu(dense + b),
        "scaled_residual": 0.75 * dense + r,
        "layernorm": _layernorm(dense + b, gamma, beta),
    }
    actual = {
        "bias_gelu": prog.bias_gelu(x, W, b),
        "scaled_residual": prog.scaled_residual(x, W, 0.75, r),
        "layernorm": prog.layernorm(x, W, b, gamma, beta),
    }
    for name, value in actual.items():
        scale = max(1.0, expected[name].abs().max().item())
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=2e-4 * scale, msg=name)


def test_the_blocked_sum_spans_blocks_and_carries_its_partial_sums_in_the_output_tile():
    ir = sd.compile(KERNELS + _schedules(8, None)).kernels["bias_gelu"].source("ir")
    assert "for n_t in [0, ((N + 31) // 32)):" in ir and "for k_o_b in [0, max((((K // 4) + 1) // 2), 1))" in ir
    assert "acc[m_i] = Y_t[n, m_i]" in ir and "Y_t[n, m_i] = acc[m_i]" in ir


def test_the_default_blocks_affine_levels_only():
    """The default blocks N:M's sum in L1-sized blocks at 64, 32 and 16 tokens (not at one token, whose
    activations are one column); CSR's compressed level is left unblocked."""
    prog = sd.compile(KERNELS.replace("@ NM(2, 4)", "@ CSR", 1), backend="llvm")
    nm = prog.kernels["bias_gelu"].instance_for(prog.pack("NM(2, 4)", torch.zeros(8, 8))).variants
    assert {name for name, f in nm.items() if "k_o_b" in func_str(f)} == {"tiles", "rows", "tiles_half", "rows_small"}
    csr = prog.kernels["bias_gelu"].instance_for(prog.pack("CSR", torch.eye(8))).variants
    assert not any("_b in" in func_str(f) for f in csr.values())


PLAIN = """
kernel linear(X: f32[M, K], W: f32[N, K] @ {fmt}) -> (Y: f32[M, N]) {{
    Y[m, n] = sum(k) X[m, k] * W[n, k]
}}
kernel linear_t(G: f32[M, N], W: f32[N, K] @ NM(2, 4)) -> (Y: f32[M, K]) {{
    Y[m, k] = sum(n) G[m, n] * W[n, k]
}}
kernel sddmm(A: f32[M, N], B: f32[M, K], S: f32[N, K] @ NM(2, 4)) -> (Y: f32[N, K] @ S) {{
    Y[n, k] = sum(m) A[m, n] * B[m, k]
}}
"""


@pytest.mark.parametrize(
    "fmt, schedule, message",
    [
        ("CSR", "schedule linear on cpu {\n  block k by 64\n}", "the compressed level of CSR stores 'k' at positions"),
        ("ELL(4)", "schedule linear on cpu {\n  block k by 64\n}", "the fixed(4) level of ELL(4)"),
        ("NM(2, 8)", "schedule linear on cpu {\n  block k by 12\n}", "a block must be a multiple of 8"),
        ("NM(2, 4)", "schedule linear on cpu {\n  block m by 64\n}", "cannot block 'm': it is not an index"),
        ("NM(2, 4)", "schedule linear_t on cpu {\n  block n by 64\n}", "carried in the output tile"),
        ("NM(2, 4)", "schedule sddmm on cpu {\n  block m by 64\n}", "carried in the output tile"),
        ("BSR(4, 4)", "schedule linear on cpu {\n  block k by 64\n}", "the compressed level of BSR(4, 4)"),
    ],
)
def test_illegal_blocks_are_located_errors(fmt, schedule, message):
    source = PLAIN.format(fmt=fmt) + schedule
    with pytest.raises(sd.ScheduleError) as err:
        sd.compile(source)
    rendered = err.value.render()
    first = rendered.splitlines()[0]
    assert f"<string>:{source.count(chr(10))}:" in first and message in first, rendered
    assert "^" in rendered
