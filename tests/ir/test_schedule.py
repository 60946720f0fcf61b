"""Schedule primitives: each changes the loop IR / TIR as it claims, illegal ones are located
errors, and kernels stay correct under hand-written schedules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sparsedsl as sd
from sparsedsl.backends.llvm.jit import vector_bits
from sparsedsl.ir import loop_ir as L
from sparsedsl.ir.schedule import loops
from sparsedsl.ir.variants import one_token_lanes
from tests.strategies import prune_to_fit

LINEAR = """
kernel linear(X: f32[M, K], W: f32[N, K] @ BSR(4, 1), b: f32[N]) -> (Y: f32[M, N]) {
    Y[m, n] = relu(sum(k) X[m, k] * W[n, k] + b[n])
}
kernel linear_t(G: f32[M, N], W: f32[N, K] @ CSR) -> (Y: f32[M, K]) {
    Y[m, k] = sum(n) G[m, n] * W[n, k]
}
kernel sddmm(A: f32[M, N], B: f32[M, K], S: f32[N, K] @ NM(2, 4)) -> (Y: f32[N, K] @ S) {
    Y[n, k] = sum(m) A[m, n] * B[m, k]
}
"""

# Two hand-written schedules per kernel, each different from the default.
SCHEDULES = {
    "linear": [
        "schedule linear on cpu { tile m by 16; parallel m_o; unroll n_i }",
        "schedule linear on cpu { tile m by 32; layout X as [m, k]; split n_o by 4 into n_oo, n_oi; parallel n_oo }",
    ],
    "linear_t": [
        "schedule linear_t on cpu { tile m by 8; parallel m_o }",
        "schedule linear_t on cpu { tile m by 16; layout G as [m, n]; split n by 2 into n_a, n_b }",
    ],
    "sddmm": [
        "schedule sddmm on cpu { parallel n; unroll k_i }",
        "schedule sddmm on cpu { split m by 8 into m_a, m_b; reorder k_o, n }",
    ],
}


def _program(schedule: str = "") -> sd.Program:
    return sd.compile(LINEAR + schedule)


# Loop names come from the levels, so a schedule fits the formats whose levels have its loops.
FORMATS = {"linear": ["BSR(4, 1)", "BSR(8, 4)"], "linear_t": ["CSR", "ELL(3)"], "sddmm": ["NM(2, 4)", "NM(1, 4)"]}


def _check(prog: sd.Program, kernel: str, fmt: str, m: int) -> None:
    gen = torch.Generator().manual_seed(m)
    n, k = 32, 48
    w = prune_to_fit(torch.randn(n, k, generator=gen), prog.format(fmt), 0.6)
    W = prog.pack(fmt, w)
    x, b, g = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen), torch.randn(m, n, generator=gen)
    pattern = W.with_values(torch.ones_like(W.values)).to_dense()
    actual, expected = {
        "linear": lambda: (prog.linear(x, W, b), F.relu(x @ w.T + b)),
        "linear_t": lambda: (prog.linear_t(g, W), g @ w),
        "sddmm": lambda: (prog.sddmm(g, x, W).to_dense(), (g.T @ x) * pattern),
    }[kernel]()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", sorted(SCHEDULES))
@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("m", [1, 23, 70])
def test_kernels_correct_under_schedules(kernel, which, m):
    prog = _program(SCHEDULES[kernel][which])
    for fmt in FORMATS[kernel]:
        _check(prog, kernel, fmt, m)


def _block_row_tile() -> int:
    """The default token tile of a 4-row block (BSR(4, 1)): its accumulators fit half the vector
    registers (variants.register_tile), 64 tokens with AVX-512, 16 with AVX2."""
    from sparsedsl.backends.llvm.jit import vector_bits

    return 64 if vector_bits() >= 512 else 16


def test_default_schedule_parallelizes_rows_and_vectorizes_tokens():
    ir = _program().kernels["linear"].source("ir")
    assert "for n_o in [0, (N // 4)) parallel:" in ir
    assert f"for m_i in [0, {_block_row_tile()}) vectorized:" in ir
    assert "for n_i in [0, 4) unrolled:" in ir
    # the transposed product scatters along the sparse level: parallel over token tiles only
    assert "for m_o in [0, ((M + 63) // 64)) parallel:" in _program().kernels["linear_t"].source("ir")


def test_tile_changes_the_token_tile():
    ir = _program("schedule linear on cpu { tile m by 16 }").kernels["linear"].source("ir")
    assert "((M + 15) // 16)" in ir and "for m_i in [0, 16) vectorized:" in ir


def test_layout_controls_staging():
    staged = _program().kernels["linear"].source("ir")
    plain = _program("schedule linear on cpu { layout X as [m, k] }").kernels["linear"].source("ir")
    assert f"local X_t: float32[K, {_block_row_tile()}]" in staged and "X_t" not in plain


@pytest.mark.parametrize("fmt", ["CSR", "BSR(4, 1)", "BSR(16, 16)"])
def test_the_default_tile_fits_the_accumulators_in_registers(fmt):
    """One row a stored value keeps 64 tokens; a 4-row block the tile whose accumulators fit half
    the registers; a 16-row block fits 16 tokens in AVX-512's 16 zmm and spills at any tile in
    AVX2's 8 ymm, where it keeps the widest (fewest weight reads)."""
    from sparsedsl.backends.llvm.jit import vector_bits

    prog = _program()
    variants = prog.kernels["linear"].lowered(prog.format(fmt))
    avx512 = vector_bits() >= 512
    tile = {"CSR": 64, "BSR(4, 1)": _block_row_tile(), "BSR(16, 16)": 16 if avx512 else 64}[fmt]
    assert variants["tiles"].meta["tile"] == tile and variants["rows_one"].meta["tile"] == 1
    assert ("rows_small" in variants) == (tile > 16)  # a 16-token default tile is not compiled twice
    if tile > 16:
        assert variants["rows_small"].meta["tile"] == 16
    assert ("tiles_half" in variants) == (tile > 32)  # nor is a half tile of 16 or less
    if tile > 32:
        assert variants["tiles_half"].meta["tile"] == tile // 2 and variants["tiles_half"].meta["measured_only"]


def test_split_and_reorder_rewrite_loops():
    ir = _program(SCHEDULES["sddmm"][1]).kernels["sddmm"].source("ir")
    assert "for k_o in" in ir.split("for n in")[0]  # k_o now outside n
    assert "for m_a in" in ir and "for m_b in [0, 8):" in ir


def test_parallel_and_unroll_reach_tir():
    tir = _program("schedule linear on cpu { parallel n_o; unroll n_i }").kernels["linear"].source("tir")
    assert "T.parallel" in tir and "T.unroll" in tir


@pytest.mark.parametrize(
    "schedule, line, message",
    [
        ("schedule linear on cpu {\n  vectorize nope\n}", 2, "has no loop 'nope'"),
        ("schedule linear on cpu {\n  parallel k\n}", 2, "cannot parallelize loop 'k'"),
        ("schedule linear_t on cpu {\n  parallel n\n}", 2, "cannot parallelize loop 'n'"),
        ("schedule linear on cpu {\n  vectorize n_o\n}", 2, "extent is not a constant"),
        ("schedule linear on cpu {\n  vectorize n_i\n}", 2, "not innermost"),
        ("schedule linear on cpu {\n  reorder n_i, k\n}", 2, "not perfectly nested"),
        ("schedule linear_t on cpu {\n  reorder k, n\n}", 2, "the bounds of 'k' depend on it"),
        ("schedule linear on cpu {\n  split n_o by 4 into k, x\n}", 2, "the kernel already uses that name"),
        ("schedule linear on cpu {\n  layout b as [n, m]\n}", 2, "must order its indices"),
        ("schedule linear on cpu {\n  parallel n_o; parallel m_o\n}", 2, "already parallel"),
    ],
)
def test_illegal_schedules_are_located_errors(schedule, line, message):
    with pytest.raises(sd.ScheduleError) as err:
        _program("\n" + schedule)
    rendered = err.value.render()
    first = rendered.splitlines()[0]
    assert f"<string>:{LINEAR.count(chr(10)) + 1 + line}:" in first and message in first
    assert "^" in rendered


def test_decode_sized_calls_pick_a_small_tile_with_its_rows_in_parallel():
    """One token runs a one-token tile, a few a 16-token tile, each with its output rows shared
    among the threads (a single tile has nothing else to share: the tile-parallel variant of a
    small tile would run on one thread); many tokens share out their tiles."""
    from sparsedsl.ir.schedule import pick

    prog = sd.compile(
        "kernel lin(X: f32[M, K], W: f32[N, K] @ CSR) -> (Y: f32[M, N]) { Y[m, n] = sum(k) X[m, k] * W[n, k] }"
    )
    variants = prog.lin.instance().variants
    assert "tiles_half" in variants  # only a measurement picks it (runtime/tuning.py)
    chosen = {tokens: pick(variants, tokens, 2) for tokens in (1, 8, 16, 17, 33, 65, 500)}
    small, one = "rows_small", "rows_one"
    assert chosen == {1: one, 8: small, 16: small, 17: "rows", 33: "rows", 65: "tiles", 500: "tiles"}
    for name in set(chosen.values()):
        parallel = [f.var.name for f in loops(variants[name].body) if f.kind is L.LoopKind.PARALLEL]
        assert parallel and (name == "tiles") == (parallel == ["m_o"]), (name, parallel)


@pytest.mark.parametrize("fmt", ["CSR", "NM(2, 4)", "ELL(3)"])
def test_one_token_sums_its_stored_values_in_vector_lanes(fmt):
    """One token: the row's stored values go a register's lanes at a time (8 on AVX2, 16 on
    AVX-512) into vector lanes of partial sums (a scalar dependency chain otherwise), the
    leftover ones and the lanes then into the sum."""
    prog = sd.compile(
        f"kernel lin(X: f32[M, K], W: f32[N, K] @ {fmt}) -> (Y: f32[M, N]) {{ Y[m, n] = sum(k) X[m, k] * W[n, k] }}"
    )
    one = prog.lin.instance().variants["rows_one"]
    width = L.const(one_token_lanes(vector_bits()))
    lanes = [f for f in loops(one.body) if f.kind is L.LoopKind.VECTORIZED and f.extent == width]
    assert lanes and "acc_v" in L.func_str(one)
    gen = torch.Generator().manual_seed(5)
    for k in (4, 12, 100):  # fewer stored values a row than lanes, and a leftover
        w = prune_to_fit(torch.randn(24, k, generator=gen), prog.format(fmt), 0.5)
        x = torch.randn(1, k, generator=gen)
        torch.testing.assert_close(prog.lin(x, prog.pack(fmt, w)), x @ w.T, rtol=1e-5, atol=1e-5)


def test_vector_sums_leave_a_loop_that_is_not_a_plain_sum_alone():
    from sparsedsl.ir.schedule import vector_sums

    acc, x = L.Buffer("acc", "float32", (L.const(1),)), L.Buffer("x", "float32", (L.SizeVar("K"),))
    k, zero = L.Var("k"), L.const(0)
    scaled = L.Store(acc, (zero,), L.mul(L.load(acc, zero), L.load(x, k)))
    func = L.LoopFunc("f", (x,), L.seq(L.Alloc(acc), L.For(k, zero, L.SizeVar("K"), scaled)))
    assert vector_sums(func, "k", 8) == func


def test_split_lanes_keep_the_inner_loop_vectorized_on_every_loop_of_the_name():
    """``m_i`` names the lanes of the zeroing, the accumulation and the write-out: all are split,
    each outer loop serial and each inner one vectorized (a vectorized loop around another one is
    what TVM cannot compile), and the kernel still gives the dense answer."""
    prog = _program("schedule linear on cpu { layout X as [m, k]; split m_i by 8 into m_a, m_b }")
    func = prog.kernels["linear"].lowered(None)["scheduled"]
    split = [f for f in loops(func.body) if f.var.name in ("m_a", "m_b")]
    assert len(split) > 2 and {(f.var.name, f.kind) for f in split} <= {
        ("m_a", L.LoopKind.SERIAL),
        ("m_b", L.LoopKind.VECTORIZED),
        ("m_a", L.LoopKind.UNROLLED),  # none today: the lanes' loops are vectorized or serial
        ("m_b", L.LoopKind.SERIAL),
    }
    for m in (1, 23, 70):
        _check(prog, "linear", "BSR(4, 1)", m)


def test_split_of_a_parallel_loop_shares_out_its_outer_loop_only():
    prog = _program("schedule linear on cpu { parallel n_o; split n_o by 3 into n_a, n_b }")
    kinds = {f.var.name: f.kind for f in loops(prog.kernels["linear"].lowered(None)["scheduled"].body)}
    assert kinds["n_a"] is L.LoopKind.PARALLEL and kinds["n_b"] is L.LoopKind.SERIAL
    _check(prog, "linear", "BSR(4, 1)", 5)


@pytest.mark.parametrize(
    "schedule, message",
    [
        ("schedule linear on cpu {\n  split n_o by 2 into N, x\n}", "cannot split into 'N': the kernel already uses"),
        ("schedule linear on cpu {\n  split n_o by 2 into b, x\n}", "cannot split into 'b': the kernel already uses"),
        ("schedule linear on cpu {\n  split n_o by 2 into k_c, x\n}", "cannot split into 'k_c'"),
        ("schedule linear on cpu {\n  split n_o by 2 into x, x\n}", "cannot split into 'x' twice"),
        ("schedule linear on cpu {\n  layout X as [m, k]; reorder m_i, z0\n}", "'m_i' must stay innermost"),
        ("schedule linear on cpu {\n  split n_o by 5000 into a, c; unroll c\n}", "cannot unroll loop 'c'"),
        ("schedule linear on cpu {\n  split n_o by 512 into a, c; unroll c; unroll n_i\n}", "2048 copies"),
        ("schedule linear on cpu {\n  split m_i by 8192 into a, c\n}", "cannot vectorize loop 'c': 8192 lanes"),
    ],
)
def test_more_illegal_schedules_are_located_errors(schedule, message):
    with pytest.raises(sd.ScheduleError) as err:
        _program("\n" + schedule)
    first = err.value.render().splitlines()[0]
    assert f"<string>:{LINEAR.count(chr(10)) + 3}:" in first and message in first


def test_llvm_runs_a_nested_parallel_loop():
    """The llvm backend outlines a parallel loop that is not the whole kernel (any loop a schedule
    makes parallel runs, as with the tvm backend)."""
    prog = sd.compile(LINEAR + "schedule linear on cpu {\n  parallel n_o\n}", backend="llvm")
    _check(prog, "linear", "BSR(4, 1)", 70)
    prog = sd.compile(LINEAR + "schedule linear on cpu { parallel m_o; unroll n_i }", backend="llvm")
    _check(prog, "linear", "BSR(4, 1)", 70)


@pytest.mark.parametrize("backend", ["tvm", "llvm"])
@pytest.mark.parametrize("fmt", ["CSC", "COO"])
def test_a_scattering_kernel_with_a_plain_free_loop_keeps_every_row(backend, fmt):
    """``Y[b, m, n]`` with ``W`` in CSC: ``b`` is the token, ``m`` a plain loop around the sum. The
    accumulator is the whole output tile, zeroed and written out once per tile, around that loop
    (zeroed inside it, each row of ``m`` used to wipe the rows before it)."""
    prog = sd.compile(
        f"kernel batched(X: f32[B, M, K], W: f32[N, K] @ {fmt}) -> (Y: f32[B, M, N]) "
        "{ Y[b, m, n] = sum(k) X[b, m, k] * W[n, k] }",
        backend=backend,
    )
    gen = torch.Generator().manual_seed(3)
    w = prune_to_fit(torch.randn(8, 12, generator=gen), prog.format(fmt), 0.5)
    for b, m in ((1, 2), (2, 3), (1, 70)):
        x = torch.randn(b, m, 12, generator=gen)
        torch.testing.assert_close(prog.batched(x, prog.pack(fmt, w)), x @ w.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["tvm", "llvm"])
def test_a_kernel_without_sparse_input_writes_its_whole_tile(backend):
    """Without a sparse input, the output row loop ``n`` is a plain loop: it runs inside the
    gathered result's tile ``Y_t``, which is written out once (allocated and written out inside
    ``n``, every row but the last was read uninitialised: garbage with the llvm backend)."""
    prog = sd.compile(
        "kernel dense(X: f32[M, K], V: f32[N, K]) -> (Y: f32[M, N]) { Y[m, n] = sum(k) X[m, k] * V[n, k] }",
        backend=backend,
    )
    gen = torch.Generator().manual_seed(4)
    for m in (1, 2, 70):
        x, v = torch.randn(m, 8, generator=gen), torch.randn(5, 8, generator=gen)
        torch.testing.assert_close(prog.dense(x, v), x @ v.T, rtol=1e-5, atol=1e-5)


def test_one_token_through_row_blocks_sums_interleaved_copies():
    """One token through BSR(4, 1): 4 blocks at a time, each into its own partial sums, the block's
    4 rows in the lanes of one vector (a scalar chain of adds waited on itself: 2-3x slower)."""
    prog = _program()
    one = prog.kernels["linear"].lowered(prog.format("BSR(4, 1)"))["rows_one"]
    ir = L.func_str(one)
    assert "local acc_u: float32[4, 4, 1]" in ir and "for k_u in [0, 4) unrolled:" in ir
    assert "for n_i in [0, 4) vectorized:" in ir


@pytest.mark.parametrize("backend", ["tvm", "llvm"])
@pytest.mark.parametrize("fmt", ["CSR", "NM(2, 4)"])
def test_a_few_tokens_sum_a_row_into_interleaved_vectors(fmt, backend):
    """A few tokens through a row of one value a step: 4 stored values at a time, each into its own
    vector of the tile's partial sums (one chain of adds was 1.3x slower at 8 tokens), the
    leftover values and then the copies into the sum; integer products keep theirs whole."""
    prog = sd.compile(
        f"kernel lin(X: f32[M, K], W: f32[N, K] @ {fmt}) -> (Y: f32[M, N]) {{ Y[m, n] = sum(k) X[m, k] * W[n, k] }}",
        backend=backend,
    )
    small = prog.lin.instance().variants["rows_small"]
    assert "acc_u: float32[4, 16]" in L.func_str(small)
    assert "_e0 in [0, 16) vectorized:" in L.func_str(small)  # the copies added a vector at a time
    gen = torch.Generator().manual_seed(6)
    for m, k in ((3, 4), (8, 20), (16, 100)):  # fewer groups than copies, and leftovers
        w = prune_to_fit(torch.randn(24, k, generator=gen), prog.format(fmt), 0.5)
        x = torch.randn(m, k, generator=gen)
        torch.testing.assert_close(prog.lin(x, prog.pack(fmt, w)), x @ w.T, rtol=1e-5, atol=1e-5)
    quantized = sd.compile(
        "kernel q(X: i8[M, K], W: i8[N, K] @ CSR) -> (Y: i32[M, N]) { Y[m, n] = sum(k) X[m, k] * W[n, k] }"
    )
    assert "acc_u" not in L.func_str(quantized.q.instance().variants["rows_small"])


@pytest.mark.parametrize(("lanes", "rows", "columns"), [(64, None, "2, 32"), (256, 4, "4, 64")])
def test_attention_keeps_its_register_tiles_in_half_the_registers(lanes, rows, columns):
    """Attention's scores and its P V sum as many rows (keys) and columns at once as fit half the
    registers: AVX2's 8 ymm hold one key's 64 lanes and a 2 x 32 tile of P V, AVX-512's 16 zmm 4
    keys (each staged query vector loaded once for the 4) and 4 x 64; the keys left over one by one."""
    from sparsedsl.ir.buffer_names import ACC
    from sparsedsl.ir.lowering import LowerOptions, lower
    from sparsedsl.ir.schedule import jammed_rows

    kernel = sd.compile(Path(sd.__file__).parent / "nn.sdsl").kernels["attention"].kernel
    func = lower(kernel, LowerOptions(register_lanes=lanes))
    ir = L.func_str(jammed_rows(func, ACC, lanes))
    assert f"local acc_r: float32[{columns}]" in ir
    if rows is None:
        assert ir == L.func_str(func)
    else:
        assert f"local acc: float32[{rows}, 64]" in ir and f"for j_r in [0, {rows}) unrolled:" in ir
        assert "for j in [((S // 4) * 4)" in ir  # the keys left over


def test_jammed_rows_leave_rows_of_their_own_length_alone():
    """A CSR row's stored values bound its loop: rows of different lengths cannot share a pass."""
    from sparsedsl.ir.buffer_names import ACC
    from sparsedsl.ir.lowering import LowerOptions, lower
    from sparsedsl.ir.schedule import jammed_rows

    prog = sd.compile(
        "kernel lin(X: f32[M, K], W: f32[N, K] @ CSR) -> (Y: f32[M, N]) { Y[m, n] = sum(k) X[m, k] * W[n, k] }"
    )
    func = lower(prog.kernels["lin"].kernel.with_format(prog.format("CSR")), LowerOptions(register_lanes=256))
    assert jammed_rows(func, ACC, 256) == func


def test_an_epilogue_reads_its_residual_and_writes_its_norm_a_vector_of_tokens_at_a_time():
    """A residual [m, n] in the epilogue is staged per tile like the activations (read in place,
    each vector of tokens was a strided gather), and a row-wise kernel's output statement is
    computed into the output tile a vector at a time before the plain transpose out (computed
    inside the transpose, it read the tile strided): the fused LayerNorm kernel at 1024 tokens
    went from 1.5x to 0.8x the time of its linear, add and F.layer_norm."""
    prog = sd.compile(Path(__file__).parents[2] / "examples" / "minilm_fused.sdsl")
    ir = prog.kernels["linear_residual_norm"].source("ir")
    assert "local R_t: float32[N, " in ir and "for s1_o in" in ir  # a second staging copy, its own loops
    assert "+ R_t[((n_o * 4) + w_n_i), m_i])" in ir
    assert "Y[((m_o * " in ir and "= Y_t[((w_o * 16) + w_i), m_i]" in ir  # the plain transpose out


def test_a_jammed_row_loop_keeps_its_kind_and_leaves_rows_that_read_back_alone():
    """A row loop shared out among threads stays shared out once jammed (variants.cpu jams after
    the default schedule has marked it parallel); rows whose loop reads back what it stores (a
    K-blocked sum carries its partial sums through the output tile) are not jammed: a read could
    move before an earlier row's write."""
    from sparsedsl.ir.buffer_names import ACC
    from sparsedsl.ir.lowering import KBlock, LowerOptions, lower
    from sparsedsl.ir.schedule import jammed_rows, set_kind

    dense = sd.compile(
        """format D = (i, j) -> (i: dense, j: dense)
        kernel lin(X: f32[M, K], W: f32[N, K] @ D) -> (Y: f32[M, N]) { Y[m, n] = sum(k) X[m, k] * W[n, k] }"""
    )
    kernel = dense.kernels["lin"].kernel.with_format(dense.format("D"))
    shared = set_kind(lower(kernel, LowerOptions()), "n", L.LoopKind.PARALLEL)
    jammed = L.func_str(jammed_rows(shared, ACC, 256))
    assert "acc: float32[4, 64]" in jammed and "for n_j in [0, (N // 4)) parallel:" in jammed
    blocked = lower(kernel, LowerOptions(block=KBlock(None, 32)))
    assert jammed_rows(blocked, ACC, 256) == blocked


def test_one_token_nm_reads_its_stored_values_contiguously():
    """Flattening an N:M row's groups and slots into lanes folds ``(g // n) * n + g % n`` back into
    ``g``: the stored values and coordinates are read as contiguous vectors, not gathered."""
    prog = sd.compile(
        "kernel lin(X: f32[M, K], W: f32[N, K] @ NM(2, 4)) -> (Y: f32[M, N]) { Y[m, n] = sum(k) X[m, k] * W[n, k] }"
    )
    one = L.func_str(prog.lin.instance().variants["rows_one"])
    assert "W_vals[" in one and not any("%" in line for line in one.splitlines() if "W_vals[" in line)
