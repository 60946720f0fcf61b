"""Windowed reads (ir/windows.py): one token through an N:M weight reads each vector of lanes'
activations as one window and permutes it, on both CPU backends, with the dense answer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsedsl as sd
from sparsedsl.backends import host
from sparsedsl.ir import loop_ir as L
from sparsedsl.ir.windows import WINDOW, permute_lanes, windowed
from tests.strategies import prune_to_fit

SOURCE = "kernel lin(X: f32[M, K], W: f32[N, K] @ {fmt}) -> (Y: f32[M, N]) {{ Y[m, n] = sum(k) X[m, k] * W[n, k] }}"
NM_FORMATS = ["NM(2, 4)", "NM(1, 4)", "NM(2, 8)", "NM(4, 8)", "NM(1, 2)"]
AVX2 = "avx2" in host.present()


def one_token(fmt: str, backend: str = "tvm") -> L.LoopFunc:
    return sd.compile(SOURCE.format(fmt=fmt), backend=backend).lin.instance().variants["rows_one"]


@pytest.mark.skipif(not AVX2, reason="windows need a variable permute (AVX2)")
@pytest.mark.parametrize("fmt", NM_FORMATS)
def test_nm_one_token_reads_windows_of_a_padded_tile(fmt):
    """Every read of the staged activations in the lanes is a window read, and the tile is
    allocated a window longer (the last group's window stays inside it)."""
    text = L.func_str(one_token(fmt))
    assert f"{WINDOW}(X_t[" in text
    assert "local X_t: float32[(K + " in text


@pytest.mark.parametrize("fmt", ["CSR", "ELL(3)", "BSR(4, 1)"])
def test_unbounded_coordinates_are_left_alone(fmt):
    """A coordinate the lowering does not bound by a constant (CSR's, ELL's: any column) has no
    window to read: those reads stay gathers."""
    assert f"{WINDOW}(" not in L.func_str(one_token(fmt))


def test_no_window_without_a_permute_of_the_loops_width():
    func = one_token("CSR")
    assert permute_lanes(128) == () and windowed(func, ()) == func
    assert permute_lanes(256) == (8,) and permute_lanes(512) == (8, 16)


@pytest.mark.skipif(not AVX2, reason="windows need a variable permute (AVX2)")
@pytest.mark.parametrize("backend", ["tvm", "llvm"])
def test_the_built_kernel_permutes_instead_of_gathering(backend):
    asm = sd.compile(SOURCE.format(fmt="NM(2, 4)"), backend=backend).lin.source("asm", "NM(2, 4)")
    one = asm[asm.index("lin_rows_one") :]
    assert "vpermps" in one
    assert "vgatherdps" not in one and "vinsertps" not in one


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(NM_FORMATS),
    backend=st.sampled_from(["tvm", "llvm"]),
    rows=st.integers(1, 40),
    groups=st.integers(1, 70),
    seed=st.integers(0, 2**16),
)
def test_one_token_nm_matches_dense(fmt, backend, rows, groups, seed):
    """Differential: one token through N:M weights of any width (windows and the leftover lanes),
    on both backends, against the dense product."""
    prog = sd.compile(SOURCE.format(fmt=fmt), backend=backend)
    m = int(fmt.split(",")[1].strip(" )"))
    gen = torch.Generator().manual_seed(seed)
    w = prune_to_fit(torch.randn(rows, groups * m, generator=gen), prog.format(fmt), None)
    x = torch.randn(1, groups * m, generator=gen)
    torch.testing.assert_close(prog.lin(x, prog.pack(fmt, w)), x @ w.T, rtol=1e-5, atol=1e-5)


def test_one_token_streams_are_fetched_ahead_inside_their_buffers():
    """The stored values and coordinates of a one-token kernel are prefetched ``AHEAD_BYTES``
    ahead (ir/prefetch.py), the element clamped to the buffer's last; the built code has them."""
    from sparsedsl.ir.prefetch import AHEAD_BYTES

    text = L.func_str(one_token("CSR"))
    assert "prefetch W_vals[min(" in text and "(W_vals_len - 1))]" in text
    assert f"+ {AHEAD_BYTES // 4}), (W_vals_len - 1))" in text
    for backend in ("tvm", "llvm"):
        assert "prefetcht0" in sd.compile(SOURCE.format(fmt="CSR"), backend=backend).lin.source("asm", "CSR")


@pytest.mark.parametrize(("per_group", "windows"), [(16, 1), (8, 0)])
def test_a_window_covers_every_lane_or_is_not_made(per_group, windows):
    """Only groups as wide as the vector loop are windows: with 16 lanes over groups of 8 values,
    lanes 8-15 would read past the width the group's window has."""
    K, v, g = L.SizeVar("K"), L.Var("v"), L.Var("g")
    x_t, crd = L.Buffer("X_t", "float32", (K, L.const(1))), L.Buffer("crd", "uint8", (K,))
    flat = L.add(L.mul(g, L.const(per_group)), v)
    read = L.load(x_t, L.add(L.mul(L.floordiv(flat, L.const(2)), L.const(4)), L.Var("c")), L.const(0))
    acc = L.Buffer("acc", "float32", (L.const(16),))
    lanes = L.For(
        v,
        L.const(0),
        L.const(16),
        L.seq(L.Let(L.Var("c"), L.Cast("int64", L.load(crd, flat))), L.Store(acc, (v,), read)),
        L.LoopKind.VECTORIZED,
    )
    body = L.seq(L.Alloc(x_t), L.Alloc(acc), L.For(g, L.const(0), L.const(4), lanes))
    func = L.LoopFunc("f", (crd,), body, {"coordinate_bounds": {"c": 4}})
    assert L.func_str(windowed(func, (16,))).count(f"{WINDOW}(") == windows


@pytest.mark.parametrize("backend", ["tvm", "llvm"])
def test_no_prefetch_of_a_position_only_the_loop_knows(backend):
    """A one-dimensional argument read at a stored value's coordinate (``s[k]``: a ``let`` of the
    vector loop) is not prefetched before the loop, where that coordinate is unknown; the kernel
    builds and gives the dense answer."""
    source = (
        "kernel lin(X: f32[M, K], W: f32[N, K] @ CSR, s: f32[K]) -> (Y: f32[M, N]) "
        "{ Y[m, n] = sum(k) X[m, k] * W[n, k] * s[k] }"
    )
    prog = sd.compile(source, backend=backend)
    assert "prefetch s[" not in L.func_str(prog.lin.instance().variants["rows_one"])
    gen = torch.Generator().manual_seed(3)
    w = prune_to_fit(torch.randn(20, 70, generator=gen), prog.format("CSR"), 0.6)
    x, s = torch.randn(1, 70, generator=gen), torch.randn(70, generator=gen)
    torch.testing.assert_close(prog.lin(x, prog.pack("CSR", w), s), (x * s) @ w.T, rtol=1e-5, atol=1e-5)
