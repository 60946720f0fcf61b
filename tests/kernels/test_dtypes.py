"""Half precision and bf16 run on the CPU backends, accumulating in f32."""

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
def test_bf16_output_rounds_to_nearest_even(backend):
    """A bf16 result is the f32 accumulator rounded as torch rounds it (the llvm backend rounds
    itself: LLVM's fptrunc to bfloat is a library call)."""
    prog = sd.compile(SOURCE, backend=backend)
    torch.manual_seed(0)
    w = sd.prune(torch.randn(8, 40), "CSR", 0.5).bfloat16()
    x = torch.randn(5, 40).bfloat16()
    y = prog.linbf(x, prog.pack("CSR", w))
    expected = (x.float() @ w.float().T).bfloat16()
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
