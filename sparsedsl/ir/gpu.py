"""Map a kernel's loop IR (lowered with ``LowerOptions(gpu=True)``) onto a CUDA grid.

* token tiles (``m_o``) -> ``blockIdx.y`` (``blockIdx.x`` when there are no rows to spread);
* the first output row loop of a gathering kernel -> ``blockIdx.x``;
* token lanes -> ``threadIdx.x``: every lane loop (``m_i``) inside the block's body is removed and the
  body wrapped in one thread loop, so each thread runs the sparse iteration for its token with its
  accumulator in registers (the tile dimension of ``acc`` is dropped);
* a scattering kernel (the transposed product) accumulates straight into its own row of the output,
  zeroed first and guarded by ``m < M`` (each thread owns one token: no races; a 16-bit output
  sums in a float32 scratch the runtime passes, ``meta["scratch"]``, cast once at the end); it is
  written transposed (``Y_T[k, m]``: a warp's updates coalesced) and its inputs read transposed.
* a kernel without tokens that gathers (SDDMM, a matrix-vector product) runs one output row per
  block (COO: one stored position per block, over the coordinate buffer's length), a warp per
  block: its dense reduction (SDDMM's tokens), else its row's stored positions, is split across the
  warp's threads, whose partial sums the warp adds (``tvm_thread_allreduce``: shuffles), and its
  inputs indexed ``[token, ...]`` are read transposed;
* a kernel without tokens that scatters into a dense output (a transposed matrix-vector product,
  any COO product) runs as kernels launched in turn: zero, add atomically a thread per row (or
  stored position), apply the epilogue (``_atomic_scatter``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace

from sparsedsl.errors import BackendError, ScheduleError, Span
from sparsedsl.ir import loop_ir as L
from sparsedsl.ir.buffer_names import ACC
from sparsedsl.ir.schedule import (
    loops,
    map_buffer,
    reorder,
    rewrite_loops,
    rewrite_stores,
    set_kind,
    split,
    substitute,
)


def _without_lane(s: L.Stmt, lane: str) -> L.Stmt:
    """Remove the lane loops (their bodies stay, the lane variable now comes from the thread)."""
    return rewrite_loops(s, lambda loop: loop.body if loop.var.name == lane else None)


def split_lanes(s: L.Stmt, lane: str, j: L.Var, per: int, tx: L.Var, adjacent: bool = False) -> L.Stmt:
    """Each lane loop becomes an unrolled loop over the thread's ``per`` tokens: lane
    ``j * threads + tx`` (a warp reads consecutive tokens at each ``j``), or with ``adjacent``
    lane ``tx * per + j`` (a thread's tokens side by side, read as one vector: a vectorised lane
    loop stays vectorised)."""

    def split(loop: L.For) -> L.Stmt | None:
        if loop.var.name != lane:
            return None
        if adjacent:
            token = L.add(L.mul(tx, L.const(per)), j)
            kind = L.LoopKind.VECTORIZED if loop.kind is L.LoopKind.VECTORIZED else L.LoopKind.UNROLLED
        else:
            token, kind = L.add(L.mul(j, L.floordiv(loop.extent, L.const(per))), tx), L.LoopKind.UNROLLED
        return L.For(j, L.const(0), L.const(per), substitute(loop.body, lane, token), kind)

    return rewrite_loops(s, split)


MAX_TOKENS_PER_THREAD = 4
MAX_ACCUMULATORS = 64


def tokens_per_thread(acc: L.Buffer, tile: int) -> int:
    """Tokens each thread of a gathering kernel computes: up to 4 (independent loads in flight,
    index work shared), fewer where the accumulators of a block row would not fit in registers,
    and never fewer than a warp of threads per tile."""
    rows = 1
    for d in acc.shape[:-1]:
        rows *= d.value if isinstance(d, L.Const) else MAX_ACCUMULATORS
    per = max(1, min(MAX_TOKENS_PER_THREAD, MAX_ACCUMULATORS // rows, tile // 32))
    while tile % per:
        per -= 1
    return per


def lane_loop(func: L.LoopFunc) -> str | None:
    """The loop over each thread's tokens that the mapping makes (``map_to_gpu(vector_tokens=True)``),
    ``<token>_j``, which a GPU schedule may vectorise; None for a kernel without tokens (the
    schedule's own check names its loops)."""
    token = func.meta.get("token")
    return f"{token}_j" if token else None


def check_vector_lanes(func: L.LoopFunc, span: Span) -> None:
    """``vectorize <token>_j`` (at ``span``), checked before mapping, which makes the loop: a kernel
    that gathers along its tokens, more than one token a thread."""
    what = f"cannot vectorize '{lane_loop(func)}'"
    if func.meta.get("mode") != "gather":
        raise ScheduleError(f"{what}: only a kernel that gathers along its tokens gives each thread several", span)
    acc = next(b for b in L.allocs(func.body) if b.name == ACC)
    if tokens_per_thread(acc, func.meta["tile"]) == 1:
        raise ScheduleError(
            f"{what}: each thread computes one token with a {func.meta['tile']}-token tile "
            f"(a larger 'tile {func.meta['token']} by ...' gives each thread up to {MAX_TOKENS_PER_THREAD})",
            span,
        )


def rebind(s: L.Stmt, name: str, kind: L.LoopKind) -> L.Stmt:
    """Give the first loop called ``name`` the kind ``kind``."""
    return _rebind_first(s, name, kind)[0]


def _rebind_first(s: L.Stmt, name: str, kind: L.LoopKind) -> tuple[L.Stmt, bool]:
    match s:
        case L.For(var, start, extent, body, k):
            if var.name == name:
                return L.For(var, start, extent, body, kind), True
            inner, done = _rebind_first(body, name, kind)
            return L.For(var, start, extent, inner, k), done
        case L.Seq(stmts):
            out, done = [], False
            for st in stmts:
                if done:
                    out.append(st)
                else:
                    rebound, done = _rebind_first(st, name, kind)
                    out.append(rebound)
            return L.Seq(tuple(out)), done
    return s, False


def _thread_body(s: L.Stmt, name: str, wrap) -> L.Stmt:
    """Apply ``wrap`` to the body of the loop called ``name``."""
    return rewrite_loops(s, lambda loop: replace(loop, body=wrap(loop.body)) if loop.var.name == name else None)


def _indexes(s: L.Stmt, buffer: str, var: str) -> bool:
    """Whether ``var`` appears in an index of ``buffer`` in ``s`` (a store or a load)."""
    accesses = [(a.buffer, a.indices) for a in (*L.stores(s), *L.loads(s))]
    return any(buf.name == buffer and any(L.uses(i, var) for i in idx) for buf, idx in accesses)


MAX_UNROLL = 64


def registers_for(s: L.Stmt, acc: str, vector: str | None = None) -> L.Stmt:
    """Keep a per-thread accumulator array in registers: every small constant loop that indexes it
    is unrolled (constant indices), and where such a loop wraps a loop that does not index it
    (``for n_i: for k_i: acc[n_i] += X[k_i] * W[n_i, k_i]``) the two are interchanged, so that each
    operand load is reused across the unrolled accumulators (each element's sum keeps its order).
    Vectorised loops called ``vector`` (a thread's adjacent tokens) stay vectorised."""

    def unroll(loop: L.For) -> L.Stmt | None:
        small = isinstance(loop.extent, L.Const) and loop.extent.value <= MAX_UNROLL
        kept = loop.kind is L.LoopKind.VECTORIZED and loop.var.name == vector
        if kept or not (small and _indexes(loop.body, acc, loop.var.name)):
            return None
        inner = loop.body
        if isinstance(inner, L.For) and not _indexes(inner, acc, inner.var.name):
            return replace(inner, body=replace(loop, body=inner.body, kind=L.LoopKind.UNROLLED))
        return replace(loop, kind=L.LoopKind.UNROLLED)

    return rewrite_loops(s, unroll)


def transpose_operands(func: L.LoopFunc, names: set[str], pad: int | None = None) -> L.LoopFunc:
    """Take the 2-D inputs ``names`` transposed (``X[m, k]`` read as ``X_T[k, m]``): consecutive
    threads (tokens) then read consecutive addresses. The caller passes the transposed tensors
    (``meta["transposed"]``). With ``pad`` (the token tile) their rows are padded with zeros to a
    whole number of tiles, ``pad * M_tiles`` (``meta["padded"]``: the new size's name, the token
    size it counts tiles of, the tile): reads need no clamp past the last token, and every row
    starts aligned, which TVM can prove, so a thread's adjacent tokens load as one vector."""
    params, body, padded = [], func.body, {}
    for p in func.params:
        if not (isinstance(p, L.Buffer) and p.name in names):
            params.append(p)
            continue
        if pad is None:
            flipped = replace(p, shape=p.shape[::-1])
            body = map_buffer(body, p.name, flipped, lambda idx: idx[::-1])
        else:
            tokens, tiles = p.shape[0], L.Var(f"{p.shape[0].name}_tiles")
            flipped = replace(p, shape=(p.shape[1], L.mul(L.const(pad), tiles)))
            body = map_buffer(body, p.name, flipped, _unclamped_transpose(L.sub(tokens, L.const(1))))
            padded[p.name] = (tiles.name, tokens.name, pad)
            if tiles not in params:
                params.append(tiles)
        params.append(flipped)
    done = tuple(sorted(n for n in names if any(p.name == n for p in func.params)))
    meta = {**func.meta, "transposed": done, **({"padded": padded} if padded else {})}
    return replace(func, params=tuple(params), body=body, meta=meta)


def _unclamped_transpose(end: L.Expr) -> Callable[[tuple], tuple]:
    """``[m, k] -> [k, m]`` with the token index's clamp to the last token (``min(m, end)``) dropped."""

    def index(idx: tuple) -> tuple:
        match idx[0]:
            case L.Bin("min", m, bound) if bound == end:
                return (idx[1], m)
        return (idx[1], idx[0])

    return index


WARP = 32


def _warp_reduction(func: L.LoopFunc) -> L.LoopFunc:
    """Spread a reduction over a warp: the innermost dense one (``m`` of SDDMM: the tokens), else
    the loop over the stored positions a row sums (a matrix-vector product). Thread ``t`` sums
    iterations ``t, t + 32, ...`` and the warp adds the partial sums (a cross-thread reduction,
    ``schedule.set_kind``). Left alone when a schedule has already split that loop, or where the
    warp cannot share the sum."""
    dense, sparse = func.meta.get("dense_reduction", ()), func.meta.get("sparse_reduction")
    r = dense[-1] if dense else sparse
    if r is None or not any(f.var.name == r for f in loops(func.body)):
        return func
    split_func = reorder(split(func, r, WARP, f"{r}_o", f"{r}_t"), [f"{r}_t", f"{r}_o"])
    try:
        return set_kind(split_func, f"{r}_t", L.LoopKind.THREAD_X)
    except ScheduleError:  # the sum does not fit a warp (a dense output's whole row): serial in the block
        return func


def map_to_gpu(func: L.LoopFunc, output: str, vector_tokens: bool = False) -> L.LoopFunc:
    """The kernel bound to CUDA blocks and threads (see the module docstring); the gathered inputs
    ``meta["thread_major"]`` (indexed [token, reduction]) are taken transposed. ``vector_tokens``
    (a gathering kernel with tokens): each thread's tokens are adjacent and its reads of the
    transposed inputs, padded to whole tiles, are vector loads."""
    meta = func.meta
    token, tile = meta.get("token"), meta.get("tile", 1)
    rows = meta.get("rows", [])
    body = func.body
    if any(f.kind is L.LoopKind.PARALLEL for f in loops(body)):
        raise BackendError("GPU kernels take their parallelism from the grid: remove 'parallel' from the schedule")
    acc = next(b for b in L.allocs(body) if b.name == ACC)
    lane = L.Var(f"{token}_i") if token else None
    if token is None and not all(isinstance(d, L.Const) for d in acc.shape):
        return transpose_operands(_atomic_scatter(func, output, acc), set(func.meta["thread_major"]))
    if token is None:
        local = replace(acc, scope="local")
        body = map_buffer(body, ACC, local, lambda idx: idx)
        row = next((f for f in loops(body) if rows and f.var.name == rows[0]), None)
        spread = _over_positions(row) if row is not None else None
        if row is not None and _on_host(row.start) and _on_host(row.extent):
            body = rebind(body, rows[0], L.LoopKind.BLOCK_X)
        elif spread is not None:
            body = rewrite_loops(body, lambda f: replace(spread, kind=L.LoopKind.BLOCK_X) if f == row else None)
        else:  # bounds read from the tensor, nothing on the host to size a grid: one block walks them
            body = _one_block(body)
        func = replace(func, body=registers_for(body, ACC))
        return transpose_operands(_warp_reduction(func), set(func.meta["thread_major"]))
    tiles = f"{token}_o"
    if meta.get("mode") == "gather":
        per = tokens_per_thread(acc, tile)
        threads, j, tx = tile // per, L.Var(f"{token}_j"), L.Var(f"{token}_t")
        local = replace(acc, shape=(*acc.shape[:-1], L.const(per)), scope="local")
        body = map_buffer(body, ACC, local, lambda idx: (*idx[:-1], j))
        if rows:
            body = rebind(body, rows[0], L.LoopKind.BLOCK_X)
            body = rebind(body, tiles, L.LoopKind.BLOCK_Y)
            host = rows[0]
        else:
            body = rebind(body, tiles, L.LoopKind.BLOCK_X)
            host = tiles
        body = _thread_body(
            body,
            host,
            lambda b: L.For(
                tx,
                L.const(0),
                L.const(threads),
                split_lanes(b, lane.name, j, per, tx, vector_tokens),
                L.LoopKind.THREAD_X,
            ),
        )
        func = replace(func, body=registers_for(body, ACC, j.name if vector_tokens else None))
        return transpose_operands(func, set(func.meta["thread_major"]), tile if vector_tokens else None)
    # scatter: accumulate in the thread's own output row (a float32 scratch for 16-bit outputs)
    func, target = _sum_target(func, output, acc)
    m = L.add(L.mul(L.Var(tiles), L.const(tile)), lane)
    order = meta["out_indices"]
    others = [i for i in order if i != token]

    def to_output(idx):
        named = dict(zip(others, idx[:-1]))
        named[token] = m
        return tuple(named[i] for i in order)

    body = _drop_copies(map_buffer(body, ACC, target, to_output))
    body = rebind(body, tiles, L.LoopKind.BLOCK_X)
    guard = L.Bin("<", m, meta["token_extent"])
    body = _thread_body(
        body,
        tiles,
        lambda b: L.For(lane, L.const(0), L.const(tile), L.If(guard, _without_lane(b, lane.name)), L.LoopKind.THREAD_X),
    )
    # the output accumulates once per stored value: [other, token] keeps a warp's updates coalesced
    flip = {output, target.name} if len(order) == 2 and order[0] == token else set()
    return transpose_operands(replace(func, body=body), set(func.meta["thread_major"]) | flip)


def _sum_target(func: L.LoopFunc, output: str, acc: L.Buffer) -> tuple[L.LoopFunc, L.Buffer]:
    """Where a scattering kernel sums: its output, or for a 16-bit output a float32 scratch of the
    output's shape that the runtime passes (``meta["scratch"]``) and the write-out casts from."""
    out = next(p for p in func.params if isinstance(p, L.Buffer) and p.name == output)
    if out.dtype == acc.dtype:
        return func, out
    scratch = L.Buffer(ACC, acc.dtype, out.shape)
    return replace(func, params=(*func.params, scratch), meta={**func.meta, "scratch": (ACC,)}), scratch


def _atomic_scatter(func: L.LoopFunc, output: str, acc: L.Buffer) -> L.LoopFunc:
    """A kernel without tokens that scatters into a whole dense output (the transposed SpMV
    ``y[k] = sum(n) W[n, k] * x[n]``, any COO product) as kernels launched in turn: the first zeroes
    the sum (``_sum_target``), the second runs the sparse iteration a thread per outer iteration (a
    row, a stored position) adding into the sum atomically, the last applies the epilogue a thread
    per element (left out when there is nothing to apply)."""
    stmts = func.body.stmts if isinstance(func.body, L.Seq) else ()
    if len(stmts) < 4 or stmts[0] != L.Alloc(acc):
        raise BackendError(f"'{func.name}': a schedule moved its accumulator, which the GPU mapping sums in place")
    func, target = _sum_target(func, output, acc)
    _, zero, *walk, writeout = (map_buffer(st, ACC, target, lambda idx: idx) for st in stmts)
    walk = rewrite_stores(L.seq(*walk), lambda st: replace(st, atomic=True))
    kernels = [_grid(st) for st in (zero, walk, _drop_copies(writeout)) if st != L.seq()]
    return replace(func, body=L.seq(*kernels))


THREADS = 128  # threads per block of a grid of independent iterations


def _grid(s: L.Stmt) -> L.Stmt:
    """A loop nest as a grid of ``THREADS``-thread blocks, a thread per iteration of its outer
    loops: the leading loops from 0 with bounds known on the host, flattened (row-major:
    consecutive threads take consecutive inner iterations), or a position loop (``_over_positions``).
    A nest that is neither runs in one thread."""
    nest = [s] if isinstance(s, L.For) else []
    while nest and isinstance(nest[-1].body, L.For) and _from_host(nest[-1].body):
        nest.append(nest[-1].body)
    if len(nest) == 1 and _from_host(s):
        loop = s
    elif nest and _from_host(s):
        flat = L.Var(f"{s.var.name}_f")
        lets = [L.Let(f.var, i) for f, i in zip(nest, L.unflatten(flat, [f.extent for f in nest]))]
        loop = L.For(flat, L.const(0), functools.reduce(L.mul, (f.extent for f in nest)), L.seq(*lets, nest[-1].body))
    else:
        loop = _over_positions(s) if isinstance(s, L.For) else None
    if loop is None:
        return _one_block(s)
    block, thread = L.Var(f"{loop.var.name}_b"), L.Var(f"{loop.var.name}_t")
    i = L.add(L.mul(block, L.const(THREADS)), thread)
    body = L.If(L.Bin("<", i, loop.extent), L.seq(L.Let(loop.var, L.add(loop.start, i)), loop.body))
    threads = L.For(thread, L.const(0), L.const(THREADS), body, L.LoopKind.THREAD_X)
    return L.For(block, L.const(0), L.ceildiv(loop.extent, THREADS), threads, L.LoopKind.BLOCK_X)


def _one_block(s: L.Stmt) -> L.For:
    """``s`` run by a grid of one block of one thread."""
    return L.For(L.Var("block"), L.const(0), L.const(1), s, L.LoopKind.BLOCK_X)


def _from_host(loop: L.For) -> bool:
    """Whether a loop runs from 0 to a bound computed from sizes alone."""
    return loop.start == L.const(0) and _on_host(loop.extent)


def _drop_copies(s: L.Stmt) -> L.Stmt:
    """Remove stores of an element to itself (the write-out of an accumulator that already is the
    output, when the epilogue does nothing) and the loops left empty."""
    match s:
        case L.Store(buf, idx, L.Load(src, same)) if src == buf and same == idx:
            return L.seq()
        case L.For(body=body):
            inner = _drop_copies(body)
            return inner if inner == L.seq() else replace(s, body=inner)
        case L.If(cond, then):
            inner = _drop_copies(then)
            return inner if inner == L.seq() else L.If(cond, inner)
        case L.Seq(stmts):
            return L.seq(*(_drop_copies(st) for st in stmts))
    return s


def _over_positions(loop: L.For) -> L.For | None:
    """A position loop whose bounds are read from the tensor (``for p in [pos[0], pos[1])`` of a
    compressed root level, COO) as a loop over every position of the coordinate buffer its first
    ``let`` reads (``let n_c = crd[p]``: the level's positions all lie in ``[0, len(crd))``), each
    iteration running only if its position is in the loop's range."""
    first = loop.body.stmts[0] if isinstance(loop.body, L.Seq) else loop.body
    reads = [e for e in L.subexprs(first.value) if isinstance(e, L.Load)] if isinstance(first, L.Let) else []
    crd = next((e.buffer for e in reads if e.indices == (loop.var,) and isinstance(e.buffer.shape[0], L.SizeVar)), None)
    if crd is None:
        return None
    inside = L.Bin("and", L.Bin("<=", loop.start, loop.var), L.Bin("<", loop.var, L.add(loop.start, loop.extent)))
    return L.For(loop.var, L.const(0), crd.shape[0], L.If(inside, loop.body))


def _on_host(e: L.Expr) -> bool:
    """Whether a launch bound can be computed from sizes alone (not from tensor contents)."""
    match e:
        case L.Const() | L.SizeVar():
            return True
        case L.Bin(_, a, b):
            return _on_host(a) and _on_host(b)
    return False


def launch_dims(func: L.LoopFunc) -> list[dict[L.LoopKind, L.Expr]]:
    """The grid and block sizes of each kernel of a GPU-mapped function, in launch order: TVM makes
    a kernel of each top-level statement holding grid loops, sized by the extent of its loop of
    each GPU kind."""
    kernels = []
    for top in func.body.stmts if isinstance(func.body, L.Seq) else (func.body,):
        dims: dict[L.LoopKind, L.Expr] = {}
        for loop in loops(top):
            gpu = loop.kind in (L.LoopKind.BLOCK_X, L.LoopKind.BLOCK_Y, L.LoopKind.THREAD_X)
            if gpu and dims.setdefault(loop.kind, loop.extent) != loop.extent:
                raise BackendError(f"two loops of '{func.name}' are bound to {loop.kind.value} with different extents")
        if dims:
            kernels.append(dims)
    return kernels
