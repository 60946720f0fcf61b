"""Tensor cores for block and N:M formats: ``schedule K on cuda { tensorize }``.

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
the write-out reads the accumulator back through shared memory, a token per thread.

An N:M layer (``_tensorize_slots``) stores no dense blocks: per 16-row block and 16-column step
the warp decompresses the weight tile into shared memory (each column the sum of its group's slots
stored there) and multiplies it the same way: the dense amount of tensor-core work, no ``mma.sp``.

Every step is loop IR with a serial meaning (``ir/emulate.py``), so the mapping is checked on the
CPU; ``backends/tvm/tir.py`` emits wmma.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from sparsedsl.errors import ScheduleError, Span
from sparsedsl.ir import loop_ir as L
from sparsedsl.ir.buffer_names import ACC, ACC_SHARED, DIRECT, fragment, shared_copy
from sparsedsl.ir.gpu import WARP, rebind, split_lanes, transpose_operands
from sparsedsl.ir.schedule import loops, map_buffer, rewrite_loops, substitute
from sparsedsl.ir.staging import BYTES, SHARED_BYTES, Box, affine, box_of, copy_box, unwrap

MAX_ACC_TILES = 16  # accumulator fragments per warp: 8 registers each
DTYPES = ("float16", "bfloat16")
T = L.TILE


def _uncast(e: L.Expr) -> L.Expr:
    return e.value if isinstance(e, L.Cast) else e


def _corner(row: L.Expr, col: L.Expr, ld: int, base: L.Expr | None = None) -> L.Expr:
    """The flat offset of tile (``row``, ``col``) of a row-major matrix with ``ld`` columns."""
    return L.add(base or L.const(0), L.add(L.mul(L.mul(row, L.const(T)), L.const(ld)), L.mul(col, L.const(T))))


def _reads_acc(s: L.Stmt) -> bool:
    return any(e.buffer.name == ACC for e in L.loads(s))


def _is_writeout(s: L.Stmt) -> bool:
    """The statement that applies the epilogue to the accumulator (reads it, writes elsewhere)."""
    return _reads_acc(s) and ACC not in {st.buffer.name for st in L.stores(s)}


def _tiles(rows: int, cols: int, body_of: Callable[[L.Var, L.Var], L.Stmt]) -> L.Stmt:
    """``body_of(i, j)`` for every tile of a ``rows x cols`` fragment, unrolled."""
    i, j = L.Var("tile_i"), L.Var("tile_j")
    if rows == T:  # one row of tiles: no loop over it
        return L.For(j, L.const(0), L.const(cols // T), body_of(L.const(0), j), L.LoopKind.UNROLLED)
    inner = L.For(j, L.const(0), L.const(cols // T), body_of(i, j), L.LoopKind.UNROLLED)
    return L.For(i, L.const(0), L.const(rows // T), inner, L.LoopKind.UNROLLED)


def _spill(acc: L.Buffer, out: L.Buffer) -> L.Stmt:
    """Store every accumulator tile to the same place of the shared ``out``."""
    rows, cols = acc.shape[0].value, acc.shape[1].value
    return _tiles(rows, cols, lambda i, j: L.TileCopy(acc, (i, j), out, _corner(i, j, cols), L.const(cols), load=False))


def _update_nest(s: L.Stmt) -> L.For | None:
    """The first ``for a: for b: for c: acc[a, c] = acc[a, c] + P * Q`` nest."""
    for loop in loops(s):
        mid = loop.body
        inner = mid.body if isinstance(mid, L.For) else None
        store = inner.body if isinstance(inner, L.For) else None
        if isinstance(store, L.Store) and store.buffer.name == ACC and store.indices == (loop.var, inner.var):
            match store.value:
                case L.Bin("+", L.Load(buf, idx), L.Bin("*", _, _)) if buf.name == ACC and idx == store.indices:
                    return loop
    return None


@dataclass(frozen=True)
class _BlockProduct:
    """The matched nest: ``acc[n_i, m_i] += X_T[k rows, token columns] * W[w_base + n_i * bn + k_i]``."""

    bm: int
    bn: int
    w: L.Buffer
    w_base: L.Expr
    x: L.Buffer
    box: Box


def _match(nest: L.For, tile: int, refuse: Callable[[str], ScheduleError], span: Span | None) -> _BlockProduct:
    """Check that the block product ``nest`` of a (transposed) gathering kernel fits tensor cores."""
    n_loop, k_loop, m_loop = nest, nest.body, nest.body.body
    extents = {f.var.name: f.extent.value for f in (n_loop, k_loop, m_loop) if isinstance(f.extent, L.Const)}
    if len(extents) < 3 or any(v % T for v in extents.values()) or tile % WARP:
        rows_, cols, tokens = (L.expr_str(f.extent) for f in (n_loop, k_loop, m_loop))
        raise refuse(
            f"its weight blocks are {rows_} x {cols} with a {tokens}-token tile; tensor cores need block "
            "sides that are multiples of 16 and a token tile that is a multiple of 32 ('tile m by 64')"
        )
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
    return _BlockProduct(bm, bn, w_read.buffer, w_part[0], x_read.buffer, box)


def _activation_tiles(
    x: L.Buffer, x_s: L.Buffer, b: L.Buffer, box: Box, rows: int, k: L.Var, j: L.Var, warp: L.For
) -> tuple[L.Stmt, L.Stmt]:
    """The activation tiles of a ``rows x tile`` box of ``X_T`` (``x_s``'s shape): a prologue that
    decides, per box, to load them straight from ``X_T`` (whole and 32-byte aligned: the token
    count a multiple of 16) or else stages the box (zero beyond the tensor), and the loads of
    k-step ``k``'s tiles ``j`` into fragment ``b``."""
    zero, tile = L.const(0), x_s.shape[1].value
    tokens, ((_, k_base), (_, m_base)) = x.shape[1], box
    flag = L.Buffer(DIRECT, "int32", (L.const(1),), "local")  # a let would be inlined, then hoisted
    direct = L.Load(flag, (zero,))
    fits = L.Bin(
        "and",
        L.Bin("==", L.mod(tokens, L.const(T)), zero),
        L.Bin(
            "and",
            L.Bin("<=", L.add(m_base, L.const(tile)), tokens),
            L.Bin("<=", L.add(k_base, L.const(rows)), x.shape[0]),
        ),
    )
    row = L.add(k_base, L.mul(k, L.const(T)))
    from_x = L.TileCopy(
        b, (zero, j), x, L.add(L.mul(row, tokens), L.add(m_base, L.mul(j, L.const(T)))), tokens, load=True
    )
    from_copy = L.TileCopy(b, (zero, j), x_s, _corner(k, j, tile), L.const(tile), load=True)
    is_direct, is_staged = L.Bin("==", direct, L.const(1, "int32")), L.Bin("==", direct, L.const(0, "int32"))
    prologue = L.seq(
        L.Alloc(flag),
        L.Store(flag, (zero,), L.Select(fits, L.const(1, "int32"), L.const(0, "int32"))),
        L.If(is_staged, copy_box(x, x_s, box, [rows, tile], warp)),
    )
    loads = L.seq(
        L.If(is_direct, L.For(j, zero, L.const(tile // T), from_x)),
        L.If(is_staged, L.For(j, zero, L.const(tile // T), from_copy)),
    )
    return prologue, loads


def tensorize(func: L.LoopFunc, span: Span | None = None) -> L.LoopFunc:
    """The kernel on tensor cores (see the module docstring); ScheduleError where it does not fit."""

    def refuse(why: str) -> ScheduleError:
        return ScheduleError(f"cannot tensorize '{func.name}': {why}", span)

    meta = func.meta
    token, tile, rows = meta.get("token"), meta.get("tile", 1), meta.get("rows", [])
    if meta.get("mode") != "gather" or token is None or not rows:
        raise refuse("tensor cores need a gathering kernel over row blocks with a token index (a linear layer)")
    func = transpose_operands(func, set(meta["thread_major"]))
    nest = _update_nest(func.body)
    if nest is None:
        return _tensorize_slots(func, refuse)
    match = _match(nest, tile, refuse, span)
    bm, bn, x, box = match.bm, match.bn, match.x, match.box
    shared = bn * tile * BYTES[x.dtype] + bm * tile * BYTES["float32"]
    if shared > SHARED_BYTES:
        raise refuse(f"its staged tile and accumulator take {shared} bytes of shared memory, more than {SHARED_BYTES}")
    a = L.Buffer(fragment(match.w.name), match.w.dtype, (L.const(bm), L.const(T)), "wmma.matrix_a")
    b = L.Buffer(fragment(x.name), x.dtype, (L.const(T), L.const(tile)), "wmma.matrix_b")
    acc = L.Buffer(ACC, "float32", (L.const(bm), L.const(tile)), "wmma.accumulator")
    x_s = L.Buffer(shared_copy(x.name), x.dtype, (L.const(bn), L.const(tile)), "shared")
    out = L.Buffer(ACC_SHARED, "float32", (L.const(bm), L.const(tile)), "shared")
    t, lane_j = L.Var(f"{token}_t"), L.Var(f"{token}_j")
    i, j, k = L.Var("tile_i"), L.Var("tile_j"), L.Var("tile_k")
    warp = L.For(t, L.const(0), L.const(WARP), None, L.LoopKind.THREAD_X)

    zero = L.const(0)
    prologue, b_tiles = _activation_tiles(x, x_s, b, box, bn, k, j, warp)
    step = L.seq(
        L.For(
            i,
            zero,
            L.const(bm // T),
            L.TileCopy(a, (i, zero), match.w, _corner(i, k, bn, match.w_base), L.const(bn), load=True),
        ),
        b_tiles,
        _tiles(bm, tile, lambda ti, tj: L.TileMma(acc, (ti, tj), a, (ti, zero), b, (zero, tj))),
    )
    products = L.seq(prologue, L.For(k, zero, L.const(bn // T), step))
    lanes = L.Var(f"{token}_i")

    def rewrite(s: L.Stmt) -> L.Stmt:
        """One statement of the row block's body, on tensor cores."""
        if isinstance(s, L.Alloc) and s.buffer.name == ACC:
            return L.seq(*(L.Alloc(buf) for buf in (acc, a, b, x_s, out)))
        if {st.buffer.name for st in L.stores(s)} == {ACC} and not _reads_acc(s):  # zeroing
            return _tiles(bm, tile, lambda ti, tj: L.TileFill(acc, (ti, tj)))
        if _is_writeout(s):  # through shared memory, a token per thread
            threads = split_lanes(map_buffer(s, ACC, out, lambda idx: idx), lanes.name, lane_j, tile // WARP, t)
            return L.seq(_spill(acc, out), replace(warp, body=threads))
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


@dataclass(frozen=True)
class _SlotProduct:
    """The matched N:M nest of one output row ``n``: over groups ``k_o`` of ``group`` columns, over
    ``slots`` stored slots ``k_i``, ``let c = crd[...]``, ``acc[m_i] += X_T[k_o * group + c, token]
    * W_vals[...]``."""

    row: L.For
    groups: L.For
    slots: L.For
    coordinate: L.Let
    value: L.Load
    x: L.Buffer
    token_index: L.Expr
    group: int


def _match_slots(func: L.LoopFunc, row: str, tile: int, refuse: Callable[[str], ScheduleError]) -> _SlotProduct:
    """Find an N:M product: a dense row loop whose groups hold a few stored slots each."""
    row_loop = next((f for f in loops(func.body) if f.var.name == row), None)
    for groups in loops(row_loop.body) if row_loop else []:
        slots = groups.body
        inner = slots.body if isinstance(slots, L.For) else None
        if not (isinstance(inner, L.Seq) and len(inner.stmts) == 2 and isinstance(inner.stmts[0], L.Let)):
            continue
        coordinate, lanes = inner.stmts
        store = lanes.body if isinstance(lanes, L.For) else None
        if not (isinstance(store, L.Store) and store.buffer.name == ACC and store.indices == (lanes.var,)):
            continue
        factors = [_uncast(f) for f in (store.value.b.a, store.value.b.b)] if isinstance(store.value.b, L.Bin) else []
        x_read = next((f for f in factors if isinstance(f, L.Load) and len(f.indices) == 2), None)
        w_read = next((f for f in factors if isinstance(f, L.Load) and f is not x_read), None)
        if x_read is None or w_read is None:
            break
        dtypes = {x_read.buffer.dtype, w_read.buffer.dtype}
        if len(dtypes) != 1 or not dtypes <= set(DTYPES):
            raise refuse("tensor cores multiply float16 or bfloat16 operands of the same type")
        names = {groups.var.name: 1, coordinate.var.name: 1}
        k_part = affine(x_read.indices[0], names)
        group = k_part[1].get(groups.var.name) if k_part else None
        if k_part is None or k_part[0] != L.const(0) or k_part[1] != {groups.var.name: group, coordinate.var.name: 1}:
            raise refuse(f"'{x_read.buffer.name}' is not read at group * width + stored slot")
        if T % group or not isinstance(slots.extent, L.Const) or tile % WARP:
            raise refuse(f"groups of {group} columns must divide 16 (and the token tile be a multiple of 32)")
        return _SlotProduct(row_loop, groups, slots, coordinate, w_read, x_read.buffer, x_read.indices[1], group)
    raise refuse("no block product 'acc[n_i, m_i] += X[..] * W[..]' and no N:M product in it")


def _tensorize_slots(func: L.LoopFunc, refuse: Callable[[str], ScheduleError]) -> L.LoopFunc:
    """An N:M linear layer on tensor cores: per 16-row block and 16-column step, the warp
    decompresses the weight tile into shared memory (``_decompress``) and multiplies it with the
    activation tiles like ``tensorize``'s blocks."""
    meta = func.meta
    token, tile, rows = meta["token"], meta["tile"], meta["rows"]
    match = _match_slots(func, rows[0], tile, refuse)
    x = match.x
    if T * tile * (BYTES[x.dtype] + BYTES["float32"]) + T * T * BYTES[x.dtype] > SHARED_BYTES:
        raise refuse(f"a {tile}-token tile takes more than {SHARED_BYTES} bytes of shared memory")
    t, lane_j, j = L.Var(f"{token}_t"), L.Var(f"{token}_j"), L.Var("tile_j")
    block, step, r = L.Var(f"{rows[0]}_t"), L.Var("k_step"), L.Var("tile_r")
    warp = L.For(t, L.const(0), L.const(WARP), None, L.LoopKind.THREAD_X)
    zero, ones = L.const(0), L.const(T)
    w_s = L.Buffer(shared_copy(match.value.buffer.name), x.dtype, (ones, ones), "shared")
    x_s = L.Buffer(shared_copy(x.name), x.dtype, (ones, L.const(tile)), "shared")
    a = L.Buffer(f"{match.value.buffer.name}_frag", x.dtype, (ones, ones), "wmma.matrix_a")
    b = L.Buffer(fragment(x.name), x.dtype, (ones, L.const(tile)), "wmma.matrix_b")
    acc = L.Buffer(ACC, "float32", (ones, L.const(tile)), "wmma.accumulator")
    out = L.Buffer(ACC_SHARED, "float32", (ones, L.const(tile)), "shared")
    row = L.add(L.mul(block, ones), r)
    decompress = _decompress(match, w_s, block, step, warp)
    wraps, core = unwrap(match.token_index, {})
    m_inner = next(f.var.name for f in loops(match.slots.body))
    m_base = affine(core, {m_inner: tile})[0]
    box = [((), L.mul(step, ones)), (wraps, m_base)]
    prologue, b_tiles = _activation_tiles(x, x_s, b, box, T, zero, j, warp)
    each = _tiles(T, tile, lambda ti, tj: L.TileMma(acc, (ti, tj), a, (ti, zero), b, (zero, tj)))
    steps = L.For(
        step,
        zero,
        L.floordiv(L.add(x.shape[0], L.const(T - 1)), ones),
        L.seq(decompress, L.TileCopy(a, (zero, zero), w_s, zero, ones, load=True), prologue, b_tiles, each),
    )
    writeout = next(s for s in match.row.body.stmts if _is_writeout(s))
    tokens = map_buffer(substitute(writeout, match.row.var.name, row), ACC, out, lambda idx: (r, *idx))
    lanes = split_lanes(
        L.For(r, zero, ones, L.If(L.Bin("<", row, match.row.extent), tokens)), f"{token}_i", lane_j, tile // WARP, t
    )
    body = L.seq(
        *(L.Alloc(buf) for buf in (acc, a, b, w_s, x_s, out)),
        _tiles(T, tile, lambda ti, tj: L.TileFill(acc, (ti, tj))),
        steps,
        _spill(acc, out),
        replace(warp, body=lanes),
    )
    blocks = L.For(block, zero, L.floordiv(L.add(match.row.extent, L.const(T - 1)), ones), body, L.LoopKind.BLOCK_X)
    new = rewrite_loops(func.body, lambda f: blocks if f.var.name == rows[0] else None)
    new = rebind(new, f"{token}_o", L.LoopKind.BLOCK_Y)
    return replace(func, body=new, meta={**func.meta, "tensor_cores": True})


def _decompress(match: _SlotProduct, w_s: L.Buffer, block: L.Var, step: L.Var, warp: L.For) -> L.Stmt:
    """The warp writes weight tile (``block``, ``step``) densely into ``w_s``: a thread per (row,
    group), each column of the group the sum of the slots stored at it (a padding slot may repeat
    a stored coordinate with a zero value), zero outside the tensor. Every element is written by
    one thread and never read back before the barrier TVM puts ahead of the tile load."""
    per_step, width = T // match.group, match.group
    r, g, pair, col, q = (L.Var(n) for n in ("tile_r", "tile_g", "tile_pair", "tile_col", "tile_q"))
    row, group = L.add(L.mul(block, L.const(T)), r), L.add(L.mul(step, L.const(per_step)), g)

    def stored(k: int) -> L.Expr:
        """Slot ``k``'s value if its coordinate is ``col``, else 0."""
        at = {match.row.var.name: row, match.groups.var.name: group, match.slots.var.name: L.const(k)}
        coordinate, value = match.coordinate.value, match.value
        for name, v in at.items():
            coordinate, value = substitute(coordinate, name, v), substitute(value, name, v)
        return L.Select(L.Bin("==", coordinate, col), value, L.const(0.0, w_s.dtype))

    total = stored(0)
    for k in range(1, match.slots.extent.value):
        total = L.add(total, stored(k))
    column = (r, L.add(L.mul(g, L.const(width)), col))
    in_range = L.Bin("and", L.Bin("<", row, match.row.extent), L.Bin("<", group, match.groups.extent))
    unpack = L.seq(
        L.Let(r, L.floordiv(pair, L.const(per_step))),
        L.Let(g, L.mod(pair, L.const(per_step))),
        L.For(col, L.const(0), L.const(width), L.Store(w_s, column, L.const(0.0, w_s.dtype))),
        L.If(in_range, L.For(col, L.const(0), L.const(width), L.Store(w_s, column, total))),
    )
    pairs = T * per_step
    thread = L.seq(
        L.Let(pair, L.add(L.mul(q, L.const(WARP)), warp.var)), L.If(L.Bin("<", pair, L.const(pairs)), unpack)
    )
    return L.For(q, L.const(0), L.const(-(-pairs // WARP)), replace(warp, body=thread))
