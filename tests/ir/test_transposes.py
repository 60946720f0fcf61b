"""Transposing copies in vector shuffles (ir/transposes.py): the shuffle plan, which nests are
rewritten, and the kernels' answers on both CPU backends where blocks are whole and where not."""

import numpy as np
import pytest
import torch

import sparsedsl as sd
from sparsedsl.ir import loop_ir as L
from sparsedsl.ir.transposes import shuffles, vector_transposes

SOURCE = """
kernel linear(X: f32[M, K], W: f32[N, K] @ BSR(4, 1), b: f32[N]) -> (Y: f32[M, N]) {
    Y[m, n] = sum(k) X[m, k] * W[n, k] + b[n]
}
"""


def test_the_shuffles_transpose_eight_vectors():
    block = np.arange(64).reshape(8, 8)
    vectors = {f"r{i}": block[i] for i in range(8)}
    for out, first, second, picks in shuffles():
        vectors[out] = np.concatenate([vectors[first], vectors[second]])[list(picks)]
    np.testing.assert_array_equal(np.stack([vectors[f"o{c}"] for c in range(8)]), block.T)


def test_staging_and_write_out_become_blocks_and_the_one_token_variant_stays():
    prog = sd.compile(SOURCE)
    variants = prog.linear.lowered(prog.format("BSR(4, 1)"))
    for name, func in variants.items():
        blocks = [s for s in L.leaves(vector_transposes(func).body) if isinstance(s, L.Transpose)]
        assert len(blocks) == (0 if name.endswith("_one") else 2), name


@pytest.mark.parametrize("backend", ["tvm", "llvm"])
@pytest.mark.parametrize(("n", "k", "m"), [(8, 8, 8), (12, 20, 13), (36, 40, 70), (4, 16, 1), (64, 24, 129)])
def test_blocks_whole_and_partial_give_the_dense_answer(backend, n, k, m):
    torch.manual_seed(n * k + m)
    prog = sd.compile(SOURCE, backend=backend)
    w = sd.prune(torch.randn(n, k), prog.format("BSR(4, 1)"), 0.5)
    x, b = torch.randn(m, k), torch.randn(n)
    torch.testing.assert_close(prog.linear(x, prog.pack("BSR(4, 1)", w), b), x @ w.T + b, rtol=1e-4, atol=1e-4)



QUANTIZED_OUTPUT = """
kernel linear_q(X: f32[M, K], W: f32[N, K] @ BSR(4, 1), b: f32[N], inv_scale: f32) -> (Q: i8[M, N]) {
    Q[m, n] = (sum(k) X[m, k] * W[n, k] + b[n]) * inv_scale
}
"""


@pytest.mark.parametrize("backend", ["tvm", "llvm"])
@pytest.mark.parametrize(("n", "k", "m"), [(8, 8, 8), (12, 20, 13), (64, 129, 70)])
def test_a_write_out_into_int8_rounds_and_saturates_each_element(backend, n, k, m):
    prog = sd.compile(QUANTIZED_OUTPUT, backend=backend)
    funcs = [vector_transposes(f) for f in prog.linear_q.lowered(None).values()]
    assert any(isinstance(s, L.Transpose) and s.convert is not None for f in funcs for s in L.leaves(f.body))
    gen = torch.Generator().manual_seed(n * k + m)
    # small integers: every sum exact in f32, so halves are ties (to even) on both sides
    w = sd.prune(torch.randint(-3, 4, (n, k), generator=gen).float(), prog.format("BSR(4, 1)"), 0.5)
    x, b = torch.randint(-3, 4, (m, k), generator=gen).float(), torch.randint(-9, 10, (n,), generator=gen).float()
    reference = torch.clamp(torch.round((x @ w.T + b) * 0.5), -128, 127).to(torch.int8)
    assert torch.equal(prog.linear_q(x, prog.pack("BSR(4, 1)", w), b, 0.5), reference)
