"""Tensor cores for block formats: ``schedule K on cuda { tensorize }``.

A gathering kernel whose sparse input stores dense row-major blocks (BSR(bm, bn), bm and bn
multiples of 16) in 16-bit floats multiplies, per stored block, ``W_blk[bm, bn] @ X_T[bn, tile]``
into a ``[bm, tile]`` accumulator: exactly what a warp's tensor cores do in 16 x 16 x 16 steps.
``tensorize`` finds that nest in the lowered loop IR,

    for n_i in [0, bm): for k_i in [0, bn): for m_i in [0, tile):
        acc[n_i, m_i] += X_T[kbase + k_i, clamp(mbase + m_i)] * W_vals[wbase + n_i * bn + k_i]

and maps the kernel onto one warp per (row block, token tile): the accumulator becomes
``wmma.accumulator`` fragments, each stored block's 16 x 16 tiles load straight from ``W_vals``,
the activation tiles straight from ``X_T`` where they are whole and aligned (else from a copy the
warp stages in shared memory, zero beyond the tensor: ``staging.copy_box``), they multiply, and
the write-out reads the accumulator back
through shared memory, a token per thread. Every step is loop IR with a serial meaning
(``ir/emulate.py``), so the mapping is checked on the CPU; ``backends/tvm/tir.py`` emits wmma.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from sparsedsl.errors import ScheduleError, Span
from sparsedsl.ir import loop_ir as L
from sparsedsl.ir.gpu import WARP, map_buffer, rebind, split_lanes, transpose_operands
from sparsedsl.ir.schedule import loops, rewrite_loops
from sparsedsl.ir.staging import BYTES, SHARED_BYTES, Box, affine, box_of, copy_box, unwrap

MAX_ACC_TILES = 16  # accumulator fragments per warp: 8 registers each
DTYPES = ("float16", "bfloat16")
T = L.TILE


def _uncast(e: L.Expr) -> L.Expr:
    return e.value if isinstance(e, L.Cast) else e


def _corner(row: L.Expr, col: L.Expr, ld: int, base: L.Expr | None = None) -> L.Expr:
    """The flat offset of tile (``row``, ``col``) of a row-major matrix with ``ld`` columns."""
    return L.add(base or L.const(0), L.add(L.mul(L.mul(row, L.const(T)), L.const(ld)), L.mul(col, L.const(T))))


def _update_nest(s: L.Stmt) -> L.For | None:
    """The first ``for a: for b: for c: acc[a, c] = acc[a, c] + P * Q`` nest."""
    for loop in loops(s):
        mid = loop.body
        inner = mid.body if isinstance(mid, L.For) else None
        store = inner.body if isinstance(inner, L.For) else None
        if isinstance(store, L.Store) and store.buffer.name == "acc" and store.indices == (loop.var, inner.var):
            match store.value:
                case L.Bin("+", L.Load(buf, idx), L.Bin("*", _, _)) if buf.name == "acc" and idx == store.indices:
                    return loop
    return None


@dataclass(frozen=True)
class _BlockProduct:
    """The matched nest: ``acc[n_i, m_i] += X_T[k rows, token columns] * W[w_base + n_i * bn + k_i]``."""

    nest: L.For
    bm: int
    bn: int
    w: L.Buffer
    w_base: L.Expr
    x: L.Buffer
    box: Box


def _match(func: L.LoopFunc, tile: int, refuse: Callable[[str], ScheduleError], span: Span | None) -> _BlockProduct:
    """Find the block product in a (transposed) gathering kernel and check it fits tensor cores."""
    nest = _update_nest(func.body)
    if nest is None:
        raise refuse("no block product 'acc[n_i, m_i] += X[..] * W[..]' in it")
    n_loop, k_loop, m_loop = nest, nest.body, nest.body.body
    extents = {f.var.name: f.extent.value for f in (n_loop, k_loop, m_loop) if isinstance(f.extent, L.Const)}
    if len(extents) < 3 or any(v % T for v in extents.values()) or tile % WARP:
        sizes = " x ".join(L.expr_str(f.extent) for f in (n_loop, k_loop, m_loop))
        raise refuse(f"its block product is {sizes}: blocks must be multiples of 16, the token tile of 32")
    bm, bn = extents[n_loop.var.name], extents[k_loop.var.name]
    if bm // T * (tile // T) > MAX_ACC_TILES:
        raise refuse(f"a {bm} x {tile} accumulator takes more than {MAX_ACC_TILES} fragments: use a smaller 'tile m'")
    product = m_loop.body.value.b
    factors = [_uncast(product.a), _uncast(product.b)]
    if not all(isinstance(f, L.Load) for f in factors):
        raise refuse("the product's factors must be tensor reads")
    w_read = next((f for f in factors if not any(L.uses(i, m_loop.var.name) for i in f.indices)), None)
    x_read = next((f for f in factors if f is not w_read), None)
    dtypes = {f.buffer.dtype for f in factors}
    if w_read is None or x_read is None or len(dtypes) != 1 or not dtypes <= set(DTYPES):
        raise refuse("tensor cores multiply float16 or bfloat16 operands of the same type")
    block = {n_loop.var.name: bm, k_loop.var.name: bn}
    w_part = affine(w_read.indices[0], block) if len(w_read.indices) == 1 else None
    if w_part is None or w_part[1] != {n_loop.var.name: bn, k_loop.var.name: 1}:
        raise refuse(f"'{w_read.buffer.name}' does not store row-major {bm} x {bn} blocks")
    x_inner = {k_loop.var.name: bn, m_loop.var.name: tile}
    strides = [(p[1] if p else None) for p in (affine(unwrap(i, x_inner)[1], x_inner) for i in x_read.indices)]
    if strides != [{k_loop.var.name: 1}, {m_loop.var.name: 1}]:
        raise refuse(f"'{x_read.buffer.name}' is not read as [k, token] tiles")
    box, box_extents, _ = box_of(x_read.buffer, nest, span)
    if box_extents != [bn, tile] or box[0][0]:
        raise refuse(f"'{x_read.buffer.name}' is read over a {box_extents} box, not [{bn}, {tile}]")
    return _BlockProduct(nest, bm, bn, w_read.buffer, w_part[0], x_read.buffer, box)


def tensorize(func: L.LoopFunc, span: Span | None = None) -> L.LoopFunc:
    """The kernel on tensor cores (see the module docstring); ScheduleError where it does not fit."""

    def refuse(why: str) -> ScheduleError:
        return ScheduleError(f"cannot tensorize '{func.name}': {why}", span)

    meta = func.meta
    token, tile, rows = meta.get("token"), meta.get("tile", 1), meta.get("rows", [])
    if meta.get("mode") != "gather" or token is None or not rows:
        raise refuse("tensor cores need a gathering kernel over row blocks with a token index (a linear layer)")
    func = transpose_operands(func, set(meta["thread_major"]))
    match = _match(func, tile, refuse, span)
    nest, bm, bn, x, box = match.nest, match.bm, match.bn, match.x, match.box
    shared = bn * tile * BYTES[x.dtype] + bm * tile * BYTES["float32"]
    if shared > SHARED_BYTES:
        raise refuse(f"its staged tile and accumulator take {shared} bytes of shared memory, more than {SHARED_BYTES}")
    a = L.Buffer(f"{match.w.name}_frag", match.w.dtype, (L.const(bm), L.const(T)), "wmma.matrix_a")
    b = L.Buffer(f"{x.name}_frag", x.dtype, (L.const(T), L.const(tile)), "wmma.matrix_b")
    acc = L.Buffer("acc", "float32", (L.const(bm), L.const(tile)), "wmma.accumulator")
    x_s = L.Buffer(f"{x.name}_s", x.dtype, (L.const(bn), L.const(tile)), "shared")
    out = L.Buffer("acc_s", "float32", (L.const(bm), L.const(tile)), "shared")
    t, lane_j = L.Var(f"{token}_t"), L.Var(f"{token}_j")
    i, j, k = L.Var("tile_i"), L.Var("tile_j"), L.Var("tile_k")
    warp = L.For(t, L.const(0), L.const(WARP), None, L.LoopKind.THREAD_X)

    def each_tile(body_of) -> L.Stmt:
        inner = L.For(j, L.const(0), L.const(tile // T), body_of(i, j), L.LoopKind.UNROLLED)
        return L.For(i, L.const(0), L.const(bm // T), inner, L.LoopKind.UNROLLED)

    # Activation tiles load straight from X_T when they are whole and 32-byte aligned (the token
    # count a multiple of 16); otherwise from the staged copy, zero beyond the tensor.
    zero = L.const(0)
    tokens, ((_, k_base), (_, m_base)) = x.shape[1], box
    flag = L.Buffer("direct", "int32", (L.const(1),), "local")  # a let would be inlined, then hoisted
    direct = L.Load(flag, (zero,))
    aligned = L.Bin("==", L.mod(tokens, L.const(T)), zero)
    whole = L.Bin("<=", L.add(m_base, L.const(tile)), tokens)
    row = L.add(k_base, L.mul(k, L.const(T)))
    from_x = L.TileCopy(
        b, (zero, j), x, L.add(L.mul(row, tokens), L.add(m_base, L.mul(j, L.const(T)))), tokens, load=True
    )
    from_copy = L.TileCopy(b, (zero, j), x_s, _corner(k, j, tile), L.const(tile), load=True)
    step = L.seq(
        L.For(
            i,
            zero,
            L.const(bm // T),
            L.TileCopy(a, (i, zero), match.w, _corner(i, k, bn, match.w_base), L.const(bn), load=True),
        ),
        L.If(L.Bin("==", direct, L.const(1, "int32")), L.For(j, zero, L.const(tile // T), from_x)),
        L.If(L.Bin("==", direct, L.const(0, "int32")), L.For(j, zero, L.const(tile // T), from_copy)),
        each_tile(lambda ti, tj: L.TileMma(acc, (ti, tj), a, (ti, zero), b, (zero, tj))),
    )
    products = L.seq(
        L.Alloc(flag),
        L.Store(flag, (zero,), L.Select(L.Bin("and", aligned, whole), L.const(1, "int32"), L.const(0, "int32"))),
        L.If(L.Bin("==", direct, L.const(0, "int32")), copy_box(x, x_s, box, [bn, tile], warp)),
        L.For(k, zero, L.const(bn // T), step),
    )
    lanes = L.Var(f"{token}_i")

    def rewrite(s: L.Stmt) -> L.Stmt:
        """One statement of the row block's body, on tensor cores."""
        if isinstance(s, L.Alloc) and s.buffer.name == "acc":
            return L.seq(*(L.Alloc(buf) for buf in (acc, a, b, x_s, out)))
        stored = {st.buffer.name for st in L.stores(s)}
        read = any(isinstance(e, L.Load) and e.buffer.name == "acc" for x in L.stmt_exprs(s) for e in L.subexprs(x))
        if stored == {"acc"} and not read:  # zeroing
            return each_tile(lambda ti, tj: L.TileFill(acc, (ti, tj)))
        if read and "acc" not in stored:  # write-out: through shared memory, a token per thread
            spill = each_tile(
                lambda ti, tj: L.TileCopy(acc, (ti, tj), out, _corner(ti, tj, tile), L.const(tile), load=False)
            )
            threads = split_lanes(map_buffer(s, "acc", out, lambda idx: idx), lanes.name, lane_j, tile // WARP, t)
            return L.seq(spill, replace(warp, body=threads))
        return rewrite_loops(s, lambda f: products if f == nest else None)

    def row_block(loop: L.For) -> L.Stmt | None:
        if loop.var.name != rows[0]:
            return None
        stmts = loop.body.stmts if isinstance(loop.body, L.Seq) else (loop.body,)
        return replace(loop, body=L.seq(*(rewrite(s) for s in stmts)))

    body = rewrite_loops(func.body, row_block)
    body = rebind(body, rows[0], L.LoopKind.BLOCK_X)
    body = rebind(body, f"{token}_o", L.LoopKind.BLOCK_Y)
    return replace(func, body=body, meta={**func.meta, "tensor_cores": True})
