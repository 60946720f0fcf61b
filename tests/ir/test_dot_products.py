"""The dot-product rewrite of int8 block products (ir/dot_products.py) on the loop IR: what it
matches and what it leaves alone. Its results are checked bit-exact in tests/kernels/test_quantized.py."""

from __future__ import annotations

import pytest

import sparsedsl as sd
from sparsedsl.ir import dot_products
from sparsedsl.ir import loop_ir as L

SOURCE = """
kernel ilinear(X: i8[M, K], W: i8[N, K] @ CSR) -> (Y: i32[M, N]) {
    Y[m, n] = sum(k) X[m, k] * W[n, k]
}
kernel ulinear(X: u8[M, K], W: i8[N, K] @ CSR) -> (Y: i32[M, N]) {
    Y[m, n] = sum(k) X[m, k] * W[n, k]
}
kernel flinear(X: f32[M, K], W: f32[N, K] @ CSR) -> (Y: f32[M, N]) {
    Y[m, n] = sum(k) X[m, k] * W[n, k]
}
"""


@pytest.fixture(scope="module")
def prog():
    return sd.compile(SOURCE, backend="llvm")


def _variants(prog, kernel: str, fmt: str) -> list[L.LoopFunc]:
    return list(prog.kernels[kernel].lowered(prog.format(fmt)).values())


def _calls(func: L.LoopFunc, name: str) -> int:
    exprs = [e for x in L.stmt_exprs(func.body) for e in L.subexprs(x)]
    return sum(isinstance(e, L.Call) and e.func == name for e in exprs)


@pytest.mark.parametrize(("fmt", "group", "steps"), [("BSR(1, 4)", 4, 1), ("BSR(1, 4)", 2, 2), ("BSR(1, 8)", 4, 2)])
def test_block_products_become_dot_steps(prog, fmt, group, steps):
    """Each block's k loop becomes ``k / group`` dot steps over words staged once per tile; the
    bytewise tile is gone; i8 activations (offset by 128 for the u8 operand) get the weight sum."""
    for func in _variants(prog, "ilinear", fmt):
        out = dot_products.rewrite(func, group)
        locals_ = {b.name: b for b in L.allocs(out.body)}
        assert "X_t" not in locals_ and locals_["X_tq"].dtype == "int32"
        assert _calls(out, "dot") == steps
        assert _calls(out, "pack") == 1
        assert ("acc_wsum" in locals_) == (group == 4)
        assert out.params == func.params


def test_u8_activations_need_no_weight_sum(prog):
    out = dot_products.rewrite(_variants(prog, "ulinear", "BSR(1, 4)")[0], 4)
    assert _calls(out, "dot") == 1
    assert "acc_wsum" not in {b.name for b in L.allocs(out.body)}


@pytest.mark.parametrize(
    ("kernel", "fmt", "group"),
    [
        ("flinear", "BSR(1, 4)", 4),  # float products
        ("ilinear", "BSR(4, 1)", 2),  # one k per block: no lane sums two products
        ("ilinear", "BSR(1, 2)", 4),  # 2 k per block: not 4
        ("ilinear", "CSR", 2),
    ],
)
def test_other_products_are_left_alone(prog, kernel, fmt, group):
    for func in _variants(prog, kernel, fmt):
        assert dot_products.rewrite(func, group) is func
