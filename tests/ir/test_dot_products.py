"""The dot-product rewrite of int8 and bf16 block products (ir/dot_products.py) on the loop IR: what
it matches and what it leaves alone. Its results are checked in tests/kernels/test_quantized.py."""

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
kernel blinear(X: bf16[M, K], W: bf16[N, K] @ CSR, b: f32[N]) -> (Y: f32[M, N]) {
    Y[m, n] = sum(k) X[m, k] * W[n, k] + b[n]
}
"""


@pytest.fixture(scope="module")
def prog():
    return sd.compile(SOURCE, backend="llvm")


def _variants(prog, kernel: str, fmt: str) -> list[L.LoopFunc]:
    return list(prog.kernels[kernel].lowered(prog.format(fmt)).values())


def _found(func: L.LoopFunc, name: str) -> list[L.Call]:
    exprs = [e for x in L.stmt_exprs(func.body) for e in L.subexprs(x)]
    return [e for e in exprs if isinstance(e, L.Call) and e.func == name]


def _calls(func: L.LoopFunc, name: str) -> int:
    return len(_found(func, name))


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


@pytest.mark.parametrize(("fmt", "steps"), [("BSR(1, 2)", 1), ("BSR(1, 4)", 2), ("BSR(2, 4)", 2)])
def test_bf16_block_products_become_dot_steps(prog, fmt, steps):
    """Each bf16 block's k loop becomes ``k / 2`` f32 dot steps taking the two bf16 weights, over
    words of 2 bf16 staged once per tile; no weight sum."""
    for func in _variants(prog, "blinear", fmt):
        out = dot_products.rewrite(func, dot_products.BF16_GROUP, "bf16")
        locals_ = {b.name: b for b in L.allocs(out.body)}
        assert "X_t" not in locals_ and locals_["X_tq"].dtype == "int32"
        dots = _found(out, "dot")
        assert len(dots) == steps
        assert all(d.dtype == "float32" and [L.dtype_of(w) for w in d.args[2:]] == ["bfloat16"] * 2 for d in dots)
        assert _calls(out, "pack") == 1
        assert "acc_wsum" not in locals_


@pytest.mark.parametrize(
    ("kernel", "fmt", "group", "dtype"),
    [
        ("flinear", "BSR(1, 4)", 4, "int8"),  # float products
        ("ilinear", "BSR(4, 1)", 2, "int8"),  # one k per block: no lane sums two products
        ("ilinear", "BSR(1, 2)", 4, "int8"),  # 2 k per block: not 4
        ("ilinear", "CSR", 2, "int8"),
        ("blinear", "BSR(1, 4)", 2, "int8"),  # bf16 products are not integer ones
        ("blinear", "BSR(4, 1)", 2, "bf16"),
        ("blinear", "CSR", 2, "bf16"),
        ("flinear", "BSR(1, 2)", 2, "bf16"),
        ("ilinear", "BSR(1, 4)", 2, "bf16"),
    ],
)
def test_other_products_are_left_alone(prog, kernel, fmt, group, dtype):
    for func in _variants(prog, kernel, fmt):
        assert dot_products.rewrite(func, group, dtype) is func


def test_bf16_products_are_summed_in_pairs_only(prog):
    with pytest.raises(sd.SdslError, match="bf16 dot products sum 2 k, not 4"):
        dot_products.rewrite(_variants(prog, "blinear", "BSR(1, 4)")[0], 4, "bf16")
