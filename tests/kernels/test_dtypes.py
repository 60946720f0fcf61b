"""Half precision runs (accumulating in f32); bf16 is a clear error on the CPU backends."""

from __future__ import annotations

import pytest
import torch

import sparsedsl as sd

SOURCE = """
kernel lin16(X: f16[M, K], W: f16[N, K] @ CSR, b: f16[N]) -> (Y: f16[M, N]) {
    Y[m, n] = gelu(sum(k) X[m, k] * W[n, k] + b[n])
}
kernel linbf(X: bf16[M, K], W: bf16[N, K] @ CSR) -> (Y: bf16[M, N]) {
    Y[m, n] = sum(k) X[m, k] * W[n, k]
}
"""


@pytest.mark.parametrize("backend", ["tvm", "llvm"])
@pytest.mark.parametrize("fmt", ["CSR", "BSR(4, 1)", "NM(2, 4)"])
def test_f16(backend, fmt):
    prog = sd.compile(SOURCE, backend=backend)
    torch.manual_seed(0)
    w = sd.prune(torch.randn(32, 48), fmt, 0.5).half()
    x, b = torch.randn(70, 48).half(), torch.randn(32).half()
    y = prog.lin16(x, prog.pack(fmt, w), b)
    assert y.dtype == torch.float16
    expected = torch.nn.functional.gelu(x.float() @ w.float().T + b.float())
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["tvm", "llvm"])
def test_bf16_is_a_clear_error(backend):
    prog = sd.compile(SOURCE, backend=backend)
    w = sd.prune(torch.randn(8, 8), "CSR", 0.5).bfloat16()
    with pytest.raises(sd.BackendError, match="bf16"):
        prog.linbf(torch.randn(2, 8).bfloat16(), prog.pack("CSR", w))
