"""Kernel IR -> loop IR by level iteration (TACO / MLIR sparse_tensor style).

The sparse input drives iteration: one loop (or none, for a singleton) per storage level, in level
order, each level asked only for its iteration capability. Dense indices that are not in the
sparse tensor become plain loops: the first free one (the *token* index, ``m`` of a linear layer)
is tiled into ``<m>_o`` / ``<m>_i`` with the inner tile vectorised, and every dense input that
pairs the token with a sparse-driven index is staged per tile as ``[other dims..., tile]`` so that
each stored value multiplies a contiguous vector of tokens (``layout X as [k, m]``).

Two accumulation strategies, chosen from the levels, never from format names:

* **gather** -- the levels above the first reduced level are dense (every output row is visited)
  and free, and the free levels below it are dense with constant extent (CSR, BSR, N:M, ELL for
  a linear layer): a small accumulator ``acc[free-below..., tile]`` per output row block, epilogue
  applied at write-out;
* **scatter** -- otherwise (CSC and COO for a linear layer, every format for the transposed
  product): the
  accumulator is the whole output tile ``acc[output dims..., tile]``, private to the token tile,
  so parallel token tiles never race; the epilogue is applied when the tile is written out.

A sparse output (``Y @ S``) shares S's structure: it is written at S's leaf positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from sparsedsl.errors import BackendError, SdslSemanticError
from sparsedsl.ir import kernel_ir as K
from sparsedsl.ir import levels as lv
from sparsedsl.ir import loop_ir as L
from sparsedsl.ir.buffer_names import ACC, stored_values, tile_copy
from sparsedsl.ir.formats import Format

ACC_DTYPE = "float32"


@dataclass(frozen=True)
class LowerOptions:
    """Choices the lowering makes before loop passes run (set by ``tile`` and ``layout``)."""

    tile: int = 64
    stage: frozenset[str] | None = None  # tensors to stage per tile; None = every eligible one
    no_stage: frozenset[str] = frozenset()
    gpu: bool = False  # no staging and no blocked write-out: ir/gpu.py maps lanes to threads
    # the sparse input's index buffer types, in format order (``Format.index_dtypes``); None: int32
    index_dtypes: tuple[str, ...] | None = None


@dataclass
class _Ctx:
    kernel: K.Kernel
    opts: LowerOptions
    extents: dict[str, L.Expr]  # index -> extent
    buffers: dict[str, L.Buffer]  # tensor name (or sparse buffer name) -> buffer
    scalars: dict[str, L.Var]
    token: str | None
    staged: dict[str, L.Buffer]
    sum_dtype: str = ACC_DTYPE  # the accumulator's: int32 for a sum of integer products
    out_dtype: str = ACC_DTYPE  # what the epilogue computes in: int32 for an integer output
    out_tile: L.Buffer | None = None  # gathered results, [other output dim, tile], written out blocked


def _sym(name: str) -> L.SizeVar:
    return L.SizeVar(name)


def lower(kernel: K.Kernel, opts: LowerOptions = LowerOptions()) -> L.LoopFunc:
    """The loop-IR function of a kernel whose sparse input has a concrete format."""
    return _lower_rows(kernel, opts) if kernel.rowwise else _lower(kernel, opts)


def _lower(kernel: K.Kernel, opts: LowerOptions, rows: Callable[[_Ctx], list[L.Stmt]] | None = None) -> L.LoopFunc:
    """One statement; ``rows``: the kernel's row-wise statements, which read its result from the
    output tile (``_lower_rows``) instead of the tile being written out."""
    reduction, epilogue = K.split_reduction(kernel.value)
    body = reduction.body if reduction else kernel.value
    if reduction is None:
        epilogue = K.KAcc()
    red_idx = reduction.indices if reduction else ()
    sparse = kernel.sparse_input
    if sparse is not None and sparse.format is None:
        raise SdslSemanticError(f"kernel '{kernel.name}' needs a format for '{sparse.name}'", kernel.span)
    s_access = next((a for a in K.accesses(body) if sparse and a.tensor == sparse.name), None)
    # frontend/check.py decides: a dense output reads the sparse input as a factor of its sum
    assert sparse is None or kernel.output.pattern_of or (reduction is not None and s_access is not None)
    s_idx: tuple[str, ...] = ()
    if sparse is not None:
        s_idx = s_access.indices if s_access else kernel.indices
    out = kernel.output
    pattern = out.pattern_of is not None

    extents: dict[str, L.Expr] = {}
    for a in [K.KAccess(out.name, kernel.indices), *K.accesses(kernel.value)]:
        for idx, dim in zip(a.indices, kernel.param(a.tensor).shape):
            extents.setdefault(idx, _sym(dim))
    dense_free = [i for i in kernel.indices if i not in s_idx]
    dense_red = [i for i in red_idx if i not in s_idx]
    token = dense_free[0] if dense_free else None
    out_dtype = "int32" if out.dtype in K.INTEGERS and _sum_dtype(kernel, kernel.value) == "int32" else ACC_DTYPE
    ctx = _Ctx(kernel, opts, extents, {}, {}, token, {}, _sum_dtype(kernel, body), out_dtype)
    params = _params(ctx)

    fmt: Format | None = sparse.format if sparse else None
    levels = fmt.levels if fmt else ()
    maps = fmt.maps if fmt else ()
    level_idx = [s_idx[m.dim] for m in maps]
    reduced = [i in red_idx for i in level_idx]
    first_red = reduced.index(True) if True in reduced else len(levels)
    below = range(first_red, len(levels))
    gather = pattern or (
        all(isinstance(lvl, lv.Dense) for lvl in levels[:first_red])
        and all(reduced[l] or (isinstance(levels[l], lv.Dense) and maps[l].op == "%") for l in below)
    )
    free_below = [l for l in below if not reduced[l]] if gather else []
    tile = opts.tile if token else 1
    lane = [L.Var(f"{token}_i")] if token else []

    # Accumulator: gather -> [free levels below the reduction..., tile]; scatter -> output tile.
    if gather:
        acc_dims = [L.const(maps[l].factor) for l in free_below]
        acc_names = [f"{_part_name(level_idx[l], maps[l])}" for l in free_below]
    else:
        acc_dims = [extents[i] for i in kernel.indices if i != token]
        acc_names = [i for i in kernel.indices if i != token]
    # TVM's LLVM backend puts small constant-size "global" allocations on the stack (LLVM then
    # keeps them in registers); "local" ones go through TVMBackendAllocWorkspace on every entry.
    acc = L.Buffer(ACC, ctx.sum_dtype, (*acc_dims, L.const(tile)) if token else tuple(acc_dims) or (L.const(1),))

    # Level loops: build the nest from the outside in, remembering coordinates and positions.
    coord_env: dict[int, L.Expr] = {}
    nest: list[L.Stmt] = []  # loops and lets, outermost first
    position: L.Expr = L.const(0)
    alloc_depth = None
    for l, (lvl, m) in enumerate(zip(levels, maps)):
        if l == first_red and gather:
            alloc_depth = len(nest)
        name = _part_name(level_idx[l], m)
        extent = m.extent(extents[level_idx[l]])
        bufs = {suffix: ctx.buffers[f"{sparse.name}_{l}_{suffix}"] for suffix in lvl.buffers()}
        it = lvl.iterate(position, extent, bufs, name)
        if it.loop is not None:
            nest.append(it.loop)
        coord = it.coordinate
        if not isinstance(coord, L.Var):
            cvar = L.Var(f"{name}_c")
            nest.append(L.Let(cvar, coord))
            coord = cvar
        coord_env[l] = coord
        position = it.position
    if alloc_depth is None:
        alloc_depth = len(nest) if gather else 0
    index_env: dict[str, L.Expr] = {}
    if fmt is not None:
        for d, value in enumerate(fmt.to_index([coord_env[l] for l in range(len(levels))])):
            index_env[s_idx[d]] = value
    index_env.update({i: L.Var(i) for i in dense_red})
    for i in dense_free:
        index_env[i] = L.Var(i) if i != token else L.add(L.mul(L.Var(f"{token}_o"), L.const(tile)), lane[0])

    # Innermost accumulation.
    acc_index = [coord_env[l] for l in free_below] if gather else [index_env[i] for i in kernel.indices if i != token]
    acc_index = [*acc_index, *lane] if token else acc_index or [L.const(0)]
    stage = _stage(ctx, body, lane[0]) if token and not opts.gpu else []
    value = _expr(body, ctx, index_env, position, lane, clamp=True, dtype=ctx.sum_dtype)
    update: L.Stmt = L.Store(acc, tuple(acc_index), L.add(L.load(acc, *acc_index), _cast(value, ctx.sum_dtype)))
    if token:
        update = L.For(lane[0], L.const(0), L.const(tile), update, L.LoopKind.VECTORIZED)
    for i in reversed(dense_red):
        update = L.For(L.Var(i), L.const(0), extents[i], update)
    reduce_part = _wrap(nest[alloc_depth:], update)

    # Zero-init and write-out of the accumulator. A 2-d output tile is written out in blocks along
    # its other dimension: strided stores of whole token columns alias in the cache.
    other = [i for i in kernel.indices if i != token]
    blocked = token is not None and not pattern and len(other) == 1 and not opts.gpu
    if blocked and (gather or rows):
        ctx.out_tile = L.Buffer(tile_copy(out.name), ctx.out_dtype, (extents[other[0]], L.const(tile)))
    zero = _fill(acc, L.const(0, ctx.sum_dtype), lane[0] if token else None)
    writeout = _writeout(
        ctx,
        acc,
        gather,
        free_below,
        maps,
        level_idx,
        coord_env,
        index_env,
        epilogue,
        position,
        acc_names,
        lane,
        fmt,
        s_idx,
    )
    if blocked and not gather and not rows:
        writeout = _tile_out(
            ctx, other[0], lambda env: _epilogue(ctx, epilogue, env, position, lane, acc, [env[other[0]]])
        )
    plain = [L.For(L.Var(i), L.const(0), extents[i], L.seq()) for i in dense_free if i != token]
    if gather:  # inside the gathered result's tile (a kernel without sparse input: ``for n`` is plain)
        inner = _wrap(plain, _wrap(nest[:alloc_depth], L.seq(L.Alloc(acc), zero, reduce_part, writeout)))
    else:  # the accumulator is the whole output tile: zeroed once, each plain loop sums into its part
        inner = L.seq(L.Alloc(acc), zero, _wrap(plain, reduce_part), writeout)
    if ctx.out_tile is not None:
        tile_buf = ctx.out_tile
        tail = rows(ctx) if rows else [_tile_out(ctx, other[0], lambda env: L.load(tile_buf, env[other[0]], lane[0]))]
        inner = L.seq(L.Alloc(tile_buf), inner, *tail)
    if token:
        inner = L.For(L.Var(f"{token}_o"), L.const(0), L.ceildiv(extents[token], tile), L.seq(*stage, inner))
    func = L.LoopFunc(kernel.name, params, inner)
    # Parallel candidates, best first: output row blocks (race-free only when gathering), token tiles.
    rows = [it.var.name for it in nest[:alloc_depth] if isinstance(it, L.For)] if gather else []
    siblings = rows[:1] + ["s_o"] + (["w_o"] if ctx.out_tile else [])
    tiles = [f"{token}_o"] if token else []
    token_size = kernel.param(out.name).shape[kernel.indices.index(token)] if token else None
    func.meta.update(
        mode="gather" if gather else "scatter",
        token=token,
        token_size=token_size,
        tile=tile,
        parallel=siblings + tiles,
        rows=rows[:1],
        out_indices=kernel.indices,
        token_extent=extents[token] if token else None,
        dense_reduction=dense_red,
        sparse_reduction=next((it.var.name for it in nest[alloc_depth:] if isinstance(it, L.For)), None)
        if gather and first_red < len(levels)
        else None,
        thread_major=_thread_major(body if reduction else None, sparse, s_idx, red_idx, token),
    )
    return func


def _lower_rows(kernel: K.Kernel, opts: LowerOptions) -> L.LoopFunc:
    """A kernel of several statements, fused per tile of tokens (rows of the output): the first
    statement, if it is a product (it reads the sparse input or sums over another index), is
    lowered as a one-statement kernel whose results stay in the output tile ``[row, tile]``; the
    other statements then run on that tile, each intermediate a tile buffer (``[row, tile]`` or
    ``[tile]``: a row's sum or max), the output written out from them in blocks."""
    if opts.gpu:
        raise BackendError(
            f"kernel '{kernel.name}' has several statements (or a max): there is no GPU mapping of row-wise "
            "kernels yet (ir/gpu.py maps one statement's tokens to threads)"
        )
    token, row = kernel.indices
    first = kernel.statements[0]
    sparse = kernel.sparse_input
    producer = bool(kernel.lets) and (
        any(sparse is not None and a.tensor == sparse.name for a in K.accesses(first.value))
        or any(isinstance(e, K.KSum) and e.indices != (row,) for e in K.subexprs(first.value))
    )
    later = kernel.statements[1:] if producer else kernel.statements
    if not producer:
        return _rows_only(kernel, opts, later)
    sub = replace(kernel, indices=first.indices, value=first.value, lets=())

    def rows(ctx: _Ctx) -> list[L.Stmt]:
        if ctx.token != token:
            raise SdslSemanticError(
                f"kernel '{kernel.name}': its rows run along '{token}', but its first statement iterates "
                f"'{token}' through the sparse input (the token index is '{ctx.token}')",
                kernel.span,
            )
        ctx.staged[first.target.name] = ctx.out_tile
        return _row_statements(ctx, later)

    return _lower(sub, opts, rows)


def _rows_only(kernel: K.Kernel, opts: LowerOptions, stmts: tuple[K.Let, ...]) -> L.LoopFunc:
    """A row-wise kernel without a product: its statements in a loop over token tiles."""
    token = kernel.indices[0]
    extents: dict[str, L.Expr] = {}
    for stmt in stmts:
        for a in [K.KAccess(stmt.target.name, stmt.indices), *K.accesses(stmt.value)]:
            for idx, dim in zip(a.indices, kernel.param(a.tensor).shape):
                extents.setdefault(idx, _sym(dim))
    ctx = _Ctx(kernel, opts, extents, {}, {}, token, {})
    params = _params(ctx)
    body = _row_statements(ctx, stmts)
    tiles = L.For(L.Var(f"{token}_o"), L.const(0), L.ceildiv(extents[token], opts.tile), L.seq(*body))
    func = L.LoopFunc(kernel.name, params, tiles)
    func.meta.update(
        mode="rows",
        token=token,
        token_size=kernel.output.shape[0],
        tile=opts.tile,
        parallel=["w_o", f"{token}_o"],
        rows=[],
        out_indices=kernel.indices,
        token_extent=extents[token],
        dense_reduction=[],
        sparse_reduction=None,
        thread_major=(),
    )
    return func


_IDENTITY = {"sum": 0.0, "max": -math.inf}


def _row_statements(ctx: _Ctx, stmts: tuple[K.Let, ...]) -> list[L.Stmt]:
    """The row-wise statements of one token tile, the output's last: each intermediate a tile
    buffer registered in ``ctx.staged`` (read like a staged input: ``[row, lane]`` or ``[lane]``),
    a reduction over the row accumulated lane by lane, then its epilogue applied in place."""
    token, row = ctx.kernel.indices
    tile, lane = ctx.opts.tile, L.Var(f"{token}_i")
    m = L.add(L.mul(L.Var(f"{token}_o"), L.const(tile)), lane)
    out: list[L.Stmt] = []

    def lanes(store: L.Stmt) -> L.Stmt:
        return L.For(lane, L.const(0), L.const(tile), store, L.LoopKind.VECTORIZED)

    *lets, last = stmts
    for stmt in lets:
        name = stmt.target.name
        reduction, epilogue = K.split_reduction(stmt.value)
        rv = L.Var(f"{row}_{name}")
        env = {token: m, row: rv}
        whole = stmt.indices == (token, row)
        buf = L.Buffer(tile_copy(name), ACC_DTYPE, (ctx.extents[row], L.const(tile)) if whole else (L.const(tile),))
        out.append(L.Alloc(buf))
        where = (rv, lane) if whole else (lane,)
        if reduction is None:
            store = L.Store(buf, where, _expr(stmt.value, ctx, env, L.const(0), [lane], clamp=True, dtype=ACC_DTYPE))
            out.append(L.For(rv, L.const(0), ctx.extents[row], lanes(store)) if whole else lanes(store))
        else:
            term = _expr(reduction.body, ctx, env, L.const(0), [lane], clamp=True, dtype=ACC_DTYPE)
            acc = L.load(buf, lane)
            combined = L.add(acc, term) if reduction.op == "sum" else L.Bin("max", acc, term)
            out.append(lanes(L.Store(buf, (lane,), L.const(_IDENTITY[reduction.op], ACC_DTYPE))))
            out.append(L.For(rv, L.const(0), ctx.extents[row], lanes(L.Store(buf, (lane,), combined))))
            if epilogue != K.KAcc():
                final = _expr(epilogue, ctx, env, L.const(0), [lane], clamp=True, acc=acc, dtype=ACC_DTYPE)
                out.append(lanes(L.Store(buf, (lane,), final)))
        ctx.staged[name] = buf
    out.append(_tile_out(ctx, row, lambda env: _expr(last.value, ctx, env, L.const(0), [lane], clamp=False)))
    return out


def _sum_dtype(kernel: K.Kernel, body: K.KExpr) -> str:
    """The accumulator's type: int32 when every operand of the sum is an integer, else float32."""
    names = [a.tensor for a in K.accesses(body)] + K.scalars(body)
    integer = bool(names) and all(kernel.param(n).dtype in K.INTEGERS for n in names)
    return "int32" if integer else ACC_DTYPE


def _thread_major(body, sparse, s_idx, red_idx, token: str | None) -> tuple[str, ...]:
    """The dense inputs a GPU mapping reads transposed, so that a warp's threads read consecutive
    addresses (``gpu.transpose_operands``): those indexed ``[thread index, other]``, the threads
    running along the token (``X[m, k]`` of a gathering product, ``k`` summed over the sparse
    input) or, in a kernel without tokens, along its dense reduction (``A[m, n]`` of SDDMM)."""
    if body is None or sparse is None:
        return ()
    stored, summed = set(s_idx), set(red_idx)

    def along_threads(first: str, second: str) -> bool:
        if token is not None:
            return first not in stored and second in stored & summed
        return first in summed - stored and second not in summed - stored

    reads = [a for a in K.accesses(body) if a.tensor != sparse.name and len(a.indices) == 2]
    return tuple(sorted({a.tensor for a in reads if along_threads(*a.indices)}))


def _part_name(index: str, m) -> str:
    return {None: index, "/": f"{index}_o", "%": f"{index}_i"}[m.op]


# A float stored as an integer is rounded to nearest (even) and saturated: quantization. The
# bounds are floats of the source type (int32's largest float32 is 2^31 - 128).
_INTEGER_RANGE = {"int8": (-128.0, 127.0), "uint8": (0.0, 255.0), "int32": (-2147483648.0, 2147483520.0)}


def _cast(e: L.Expr, dtype: str) -> L.Expr:
    src = L.dtype_of(e)
    if src == dtype:
        return e
    if dtype in _INTEGER_RANGE and src not in K.INTEGERS and src.startswith(("float", "bfloat")):
        lo, hi = _INTEGER_RANGE[dtype]
        rounded = L.Call("round_even", (e,), src)
        e = L.Bin("max", L.Bin("min", rounded, L.const(hi, src)), L.const(lo, src))
    return L.Cast(dtype, e)


def _wrap(nest: list[L.Stmt], body: L.Stmt) -> L.Stmt:
    """Put ``body`` inside a list of loops and lets, outermost first."""
    for item in reversed(nest):
        body = L.seq(item, body) if isinstance(item, L.Let) else L.with_body(item, body)
    return body


def _fill(buf: L.Buffer, value: L.Expr, lane: L.Var | None = None) -> L.Stmt:
    """``buf[...] = value``; the last dimension's loop is the token lane when ``lane`` is given."""
    vars_ = [L.Var(f"z{d}") for d in range(len(buf.shape))]
    if lane is not None:
        vars_[-1] = lane
    stmt: L.Stmt = L.Store(buf, tuple(vars_), value)
    for v, extent in reversed(list(zip(vars_, buf.shape))):
        kind = L.LoopKind.VECTORIZED if v is vars_[-1] and isinstance(extent, L.Const) else L.LoopKind.SERIAL
        stmt = L.For(v, L.const(0), extent, stmt, kind)
    return stmt


def _params(ctx: _Ctx) -> tuple[L.Buffer | L.Var, ...]:
    kernel = ctx.kernel
    params: list[L.Buffer | L.Var] = []
    bound: set[str] = set()
    for p in (*kernel.inputs, kernel.output):
        if p.shape is not None and not p.sparse:
            bound.update(p.shape)
    for p in (*kernel.inputs, kernel.output):
        if p.shape is None:
            var = L.Var(p.name, p.dtype)
            ctx.scalars[p.name] = var
            params.append(var)
        elif not p.sparse:
            buf = L.Buffer(p.name, p.dtype, tuple(_sym(d) for d in p.shape))
            ctx.buffers[p.name] = buf
            params.append(buf)
        elif p.pattern_of:
            src = ctx.buffers[stored_values(p.pattern_of)]
            buf = L.Buffer(stored_values(p.name), p.dtype, src.shape)
            ctx.buffers[buf.name] = buf
            params.append(buf)
        else:
            names = p.format.buffer_names(p.name)
            index_dtypes = ctx.opts.index_dtypes or ("int32",) * (len(names) - 1)
            for name, dtype in zip(names, (*index_dtypes, p.dtype)):
                buf = L.Buffer(name, dtype, (_sym(f"{name}_len"),))
                ctx.buffers[name] = buf
                params.append(buf)
            for dim in p.shape:
                if dim not in bound:
                    params.append(L.Var(dim, "int64"))
                    bound.add(dim)
    return tuple(params)


def _stageable(ctx: _Ctx, access: K.KAccess) -> bool:
    p = ctx.kernel.param(access.tensor)
    if p.sparse or ctx.token is None or ctx.token not in access.indices or len(access.indices) < 2:
        return False
    if access.tensor in ctx.opts.no_stage:
        return False
    return ctx.opts.stage is None or access.tensor in ctx.opts.stage


def _stage(ctx: _Ctx, body: K.KExpr, lane: L.Var) -> list[L.Stmt]:
    """Copy each stageable input's token tile into ``<X>_t[other dims..., tile]`` (token last)."""
    stmts: list[L.Stmt] = []
    tile = ctx.opts.tile
    for access in K.accesses(body):
        if access.tensor in ctx.staged or not _stageable(ctx, access):
            continue
        src = ctx.buffers[access.tensor]
        others = [i for i in access.indices if i != ctx.token]
        staged = L.Buffer(tile_copy(access.tensor), src.dtype, (*[ctx.extents[i] for i in others], L.const(tile)))
        ctx.staged[access.tensor] = staged
        if len(others) == 1:
            indices, other = access.indices, others[0]
            copy = _blocked(
                ctx,
                other,
                "s",
                lambda env, src=src, indices=indices: L.load(src, *[env[i] for i in indices]),
                lambda env, other=other: (env[other], lane),
                staged,
                clamp=True,
            )
        else:
            env = {i: L.Var(f"s_{i}") for i in others}
            env[ctx.token] = _clamped_token(ctx, lane)
            value = L.load(src, *[env[i] for i in access.indices])
            copy = L.For(lane, L.const(0), L.const(tile), L.Store(staged, (*[env[i] for i in others], lane), value))
            for i in reversed(others):
                copy = L.For(env[i], L.const(0), ctx.extents[i], copy)
        stmts += [L.Alloc(staged), copy]
    return stmts


def _clamped_token(ctx: _Ctx, lane: L.Var) -> L.Expr:
    """The token index of a lane, clamped into range: lanes past the end compute junk, never stored."""
    tile = ctx.opts.tile
    m = L.add(L.mul(L.Var(f"{ctx.token}_o"), L.const(tile)), lane)
    return L.minimum(m, L.sub(ctx.extents[ctx.token], L.const(1)))


def _expr(
    e: K.KExpr,
    ctx: _Ctx,
    env: dict[str, L.Expr],
    leaf: L.Expr,
    lane: list[L.Var],
    clamp: bool,
    acc: L.Expr | None = None,
    dtype: str | None = None,
) -> L.Expr:
    """Kernel-IR expression -> loop-IR expression, accesses resolved to buffers, computed in
    ``dtype`` (None: the epilogue's, ``ctx.out_dtype``)."""
    dtype = dtype or ctx.out_dtype
    kernel = ctx.kernel
    sparse = kernel.sparse_input
    match e:
        case K.KAcc():
            return _cast(acc, dtype)
        case K.KConst(value):
            return L.const(int(value) if dtype in K.INTEGERS else float(value), dtype)
        case K.KScalar(name):
            return _cast(ctx.scalars[name], dtype)
        case K.KSize(name):
            return _cast(L.SizeVar(name), dtype)
        case K.KAccess(t, indices):
            if sparse is not None and t == sparse.name:
                return _cast(L.load(ctx.buffers[stored_values(t)], leaf), dtype)
            if t in ctx.staged:
                idx = [env[i] for i in indices if i != ctx.token]
                return _cast(L.load(ctx.staged[t], *idx, lane[0]), dtype)
            idx = [(_clamped_token(ctx, lane[0]) if clamp and i == ctx.token else env[i]) for i in indices]
            return _cast(L.load(ctx.buffers[t], *idx), dtype)
        case K.KBin(op, a, b):
            x = _expr(a, ctx, env, leaf, lane, clamp, acc, dtype)
            y = _expr(b, ctx, env, leaf, lane, clamp, acc, dtype)
            return L.Bin(op, x, y)
        case K.KCall(func, args):
            xs = [_expr(a, ctx, env, leaf, lane, clamp, acc, dtype) for a in args]
            return _call(func, xs)
    raise AssertionError(e)


# erf(x) = x P(x^2) / Q(x^2) on [-4, 4] (and +-1 beyond): the float32 rational approximation of
# Eigen and XLA, a few ulp from the true value. Plain arithmetic, so it vectorises: a call to
# libm's erff in a vector loop is scalarised and costs 15x the whole sparse product.
_ERF_P = (
    -2.72614225801306e-10,
    2.77068142495902e-08,
    -2.10102402082508e-06,
    -5.69250639462346e-05,
    -7.34990630326855e-04,
    -2.95459980854025e-03,
    -1.60960333262415e-02,
)
_ERF_Q = (
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
)


def _horner(coefficients: tuple[float, ...], x: L.Expr) -> L.Expr:
    value: L.Expr = L.const(coefficients[0], ACC_DTYPE)
    for c in coefficients[1:]:
        value = L.Bin("+", L.Bin("*", value, x), L.const(c, ACC_DTYPE))
    return value


def _erf(x: L.Expr) -> L.Expr:
    four = L.const(4.0, ACC_DTYPE)
    clamped = L.Bin("max", L.Bin("min", x, four), L.const(-4.0, ACC_DTYPE))
    x2 = L.Bin("*", clamped, clamped)
    return L.Bin("/", L.Bin("*", clamped, _horner(_ERF_P, x2)), _horner(_ERF_Q, x2))


# exp(x) = 2^n p(r), n = round(x / ln 2), r = x - n ln 2 (in two parts), p of degree 6: Cephes'
# expf, accurate to ~1 ulp. ``exp2i`` builds 2^n from the exponent bits: all of it vectorises.
_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def _exp(x: L.Expr) -> L.Expr:
    c = lambda v: L.const(v, ACC_DTYPE)  # noqa: E731
    x = L.Bin("max", L.Bin("min", x, c(88.3762626647949)), c(-87.3365447504019))
    n = L.Call("floor", (L.Bin("+", L.Bin("*", x, c(1.44269504088896341)), c(0.5)),), ACC_DTYPE)
    r = L.Bin("-", L.Bin("-", x, L.Bin("*", n, c(0.693359375))), L.Bin("*", n, c(-2.12194440e-4)))
    p = L.Bin("+", L.Bin("+", L.Bin("*", _horner(_EXP_P, r), L.Bin("*", r, r)), r), c(1.0))
    return L.Bin("*", p, L.Call("exp2i", (n,), ACC_DTYPE))


def _call(func: str, xs: list[L.Expr]) -> L.Expr:
    x = xs[0]
    zero, one, half = (L.const(v, ACC_DTYPE) for v in (0.0, 1.0, 0.5))
    if func == "relu":
        return L.Bin("max", x, zero)
    if func in ("max", "min"):
        return L.Bin(func, x, xs[1])
    if func == "gelu":
        erf = _erf(L.Bin("*", x, L.const(1 / math.sqrt(2.0), ACC_DTYPE)))
        return L.Bin("*", L.Bin("*", half, x), L.Bin("+", one, erf))
    if func == "exp":
        return _exp(x)
    if func in ("sigmoid", "silu"):
        sigmoid = L.Bin("/", one, L.Bin("+", one, _exp(L.Bin("-", zero, x))))
        return sigmoid if func == "sigmoid" else L.Bin("*", x, sigmoid)
    if func == "tanh":  # 2 sigmoid(2x) - 1
        two = L.const(2.0, ACC_DTYPE)
        return L.Bin("-", L.Bin("/", two, L.Bin("+", one, _exp(L.Bin("*", L.const(-2.0, ACC_DTYPE), x)))), one)
    return L.Call(func, (x,), ACC_DTYPE)


def _epilogue(ctx: _Ctx, epilogue: K.KExpr, env, position, lane, acc: L.Buffer, acc_index) -> L.Expr:
    """The output value: the epilogue applied to the accumulator element at ``acc_index``."""
    acc_value = L.load(acc, *acc_index, *lane) if lane else L.load(acc, *(acc_index or [L.const(0)]))
    return _cast(_expr(epilogue, ctx, env, position, lane, clamp=False, acc=acc_value), ctx.kernel.output.dtype)


BLOCK = 16  # floats per cache line: transposes move whole lines on both sides


def _blocked(ctx: _Ctx, other: str, prefix: str, value_of, target_of, target: L.Buffer, clamp: bool) -> L.Stmt:
    """A blocked transpose between a [other, tile] buffer and a token-indexed 2-d tensor:
    ``for <p>_o: for lane: for <p>_i in 16`` so both sides move whole cache lines (a column
    walk with a power-of-two row stride would alias in the cache). ``value_of(env)`` is what to
    store and ``target_of(env)`` where, in ``target``; lanes past the last token are clamped
    (``clamp``) or skipped."""
    tile = ctx.opts.tile
    outer, inner, lane = L.Var(f"{prefix}_o"), L.Var(f"{prefix}_i"), L.Var(f"{ctx.token}_i")
    w = L.add(L.mul(outer, L.const(BLOCK)), inner)
    m = L.add(L.mul(L.Var(f"{ctx.token}_o"), L.const(tile)), lane)
    env = {other: w, ctx.token: _clamped_token(ctx, lane) if clamp else m}
    guard = L.Bin("<", w, ctx.extents[other])
    if not clamp:
        guard = L.Bin("and", L.Bin("<", m, ctx.extents[ctx.token]), guard)
    store = L.If(guard, L.Store(target, tuple(target_of(env)), _cast(value_of(env), target.dtype)))
    body = L.For(lane, L.const(0), L.const(tile), L.For(inner, L.const(0), L.const(BLOCK), store))
    return L.For(outer, L.const(0), L.ceildiv(ctx.extents[other], BLOCK), body)


def _tile_out(ctx: _Ctx, other: str, value_of) -> L.Stmt:
    """Write a [other, tile] result to the 2-d output, in blocks along ``other``."""
    out = ctx.kernel.output
    return _blocked(
        ctx, other, "w", value_of, lambda env: [env[i] for i in ctx.kernel.indices], ctx.buffers[out.name], clamp=False
    )


def _writeout(
    ctx, acc, gather, free_below, maps, level_idx, coord_env, index_env, epilogue, position, acc_names, lane, fmt, s_idx
) -> L.Stmt:
    """Apply the epilogue to the accumulator and store it to the output (guarding the tile tail)."""
    kernel = ctx.kernel
    out = kernel.output
    token = ctx.token
    env = dict(index_env)
    loops: list[tuple[L.Var, L.Expr]] = []
    if gather:
        coords = dict(coord_env)
        wvars = []
        for l in free_below:
            v = L.Var(f"w_{_part_name(level_idx[l], maps[l])}")
            coords[l] = v
            wvars.append(v)
            loops.append((v, L.const(maps[l].factor)))
        if fmt is not None:
            for d, value in enumerate(fmt.to_index([coords[l] for l in range(len(maps))])):
                env[s_idx[d]] = value
        acc_index = list(wvars)
    else:
        wvars = [L.Var(f"w_{name}") for name in acc_names]
        for name, v in zip(acc_names, wvars):
            env[name] = v
            loops.append((v, ctx.extents[name]))
        acc_index = list(wvars)
    if token:
        acc_index.append(lane[0])
    acc_value = L.load(acc, *(acc_index or [L.const(0)]))
    # into the output tile, lanes past the last token are computed too: their reads must be clamped
    clamp = ctx.out_tile is not None
    value = _cast(_expr(epilogue, ctx, env, position, lane, clamp=clamp, acc=acc_value), out.dtype)
    if out.pattern_of:
        store: L.Stmt = L.Store(ctx.buffers[stored_values(out.name)], (position,), value)
    elif ctx.out_tile is not None:
        other = next(i for i in kernel.indices if i != token)
        store = L.Store(ctx.out_tile, (env[other], lane[0]), _cast(value, ctx.out_dtype))
    else:
        store = L.Store(ctx.buffers[out.name], tuple(env[i] for i in kernel.indices), value)
    if ctx.out_tile is not None:
        store = L.For(lane[0], L.const(0), L.const(ctx.opts.tile), store, L.LoopKind.VECTORIZED)
    elif token:
        store = L.If(L.Bin("<", env[token], ctx.extents[token]), store)
        store = L.For(lane[0], L.const(0), L.const(ctx.opts.tile), store)
    for v, extent in reversed(loops):
        store = L.For(v, L.const(0), extent, store)
    return store
