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

A row-wise kernel (``let`` intermediates, a ``max``) is fused per token tile: its first statement,
a product, is lowered as above into the output tile ``Y_t[row, tile]``, and the others run on that
tile (``_Lowering.rows``), their intermediates tile buffers, never whole tensors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass, replace

from sparsedsl.errors import BackendError, ScheduleError, SdslSemanticError, Span
from sparsedsl.ir import kernel_ir as K
from sparsedsl.ir import levels as lv
from sparsedsl.ir import loop_ir as L
from sparsedsl.ir.buffer_names import ACC, ROW_OUT, ROW_SUM, batch_copy, stored_values, tile_copy
from sparsedsl.ir.formats import Format

ACC_DTYPE = "float32"
POINTWISE_LANES = 16  # a pointwise kernel's vector: one AVX-512 register of f32, two of AVX2


@dataclass(frozen=True)
class KBlock:
    """K-blocking (``block k by 96``): the sum over the sparse input's first summed level runs in
    blocks of ``size`` values of index ``index`` (None: that level's, ``size`` rounded down to a
    multiple of what one of its coordinates spans), every output row block summing one block before
    the next, so the staged activations of one block (``size`` x tile floats) stay in L1 while the
    rows stream through it; the partial sums are carried in the output tile between blocks."""

    index: str | None
    size: int
    span: Span | None = None


@dataclass(frozen=True)
class LowerOptions:
    """Choices the lowering makes before loop passes run (set by ``tile`` and ``layout``)."""

    tile: int = 64
    stage: frozenset[str] | None = None  # tensors to stage per tile; None = every eligible one
    no_stage: frozenset[str] = frozenset()
    gpu: bool = False  # no staging and no blocked write-out: ir/gpu.py maps lanes to threads
    # the sparse input's index buffer types, in format order (``Format.index_dtypes``); None: int32
    index_dtypes: tuple[str, ...] | None = None
    block: KBlock | None = None  # K-blocking of the sum (``block k by kc``)
    # f32 accumulator lanes that fit half the vector registers (``variants.register_lanes``): 64 in
    # 8 of AVX2's 16 ymm, 256 in 16 of AVX-512's 32 zmm
    register_lanes: int = 64


def _sym(name: str) -> L.SizeVar:
    return L.SizeVar(name)


def lower(kernel: K.Kernel, opts: LowerOptions = LowerOptions()) -> L.LoopFunc:
    """The loop-IR function of a kernel whose sparse input has a concrete format."""
    if kernel.batch:
        return _batched(kernel, lower(kernel.unbatched(), opts))
    if _pointwise(kernel, opts):
        return _Pointwise(kernel, opts).function()
    if not kernel.rowwise:
        return _Nest(kernel, opts).function()
    if opts.block is not None and not (kernel.product_first and not _masked(kernel)):
        raise ScheduleError(
            f"cannot block the sum of kernel '{kernel.name}': only a product's sum is blocked, and this "
            "row-wise kernel's first statement is not one read through the sparse input's rows",
            opts.block.span,
        )
    if opts.gpu:
        raise BackendError(
            f"kernel '{kernel.name}' has several statements (or a max): there is no GPU mapping of row-wise "
            "kernels yet (ir/gpu.py maps one statement's tokens to threads)"
        )
    if not kernel.product_first:
        return _Rows(kernel, opts).function()
    if _masked(kernel):
        return _Masked(kernel, opts).function()
    first = kernel.lets[0]
    # the first statement as a one-statement kernel (into the output's tile), then the others
    nest = _Nest(replace(kernel, indices=first.indices, value=first.value, lets=()), opts, rowwise=True)
    assert nest.token == kernel.indices[0]  # frontend/check.py: the sparse input does not store the token

    def rows() -> list[L.Stmt]:
        nest.staged[first.target.name] = nest.out_tile  # H is read from the output tile
        return nest.rows(kernel.statements[1:])

    return nest.function(rows)


class _Lowering:
    """What every part of a kernel's lowering reads: the kernel, its options, index extents, the
    buffers and scalars of its parameters, the token index and its tile, the inputs staged per
    tile (and the intermediates, read the same way), the output tile."""

    def __init__(self, kernel: K.Kernel, opts: LowerOptions, extents: dict[str, L.Expr], token: str | None):
        self.kernel, self.opts, self.extents, self.token = kernel, opts, extents, token
        self.buffers: dict[str, L.Buffer] = {}  # tensor name (or sparse buffer name) -> buffer
        self.scalars: dict[str, L.Var] = {}
        self.staged: dict[str, L.Buffer] = {}
        self.staging_loops: list[str] = []  # the outer loops of the blocked staging copies
        self.sum_dtype = ACC_DTYPE  # the accumulator's: int32 for a sum of integer products
        self.out_dtype = ACC_DTYPE  # what the epilogue computes in: int32 for an integer output
        self.out_tile: L.Buffer | None = None  # results [other output dim, tile], written out blocked
        self.params = self._params()

    def _params(self) -> tuple[L.Buffer | L.Var, ...]:
        kernel = self.kernel
        params: list[L.Buffer | L.Var] = []
        bound: set[str] = set()
        for p in (*kernel.inputs, kernel.output):
            if p.shape is not None and not p.sparse:
                bound.update(p.shape)
        for p in (*kernel.inputs, kernel.output):
            if p.shape is None:
                var = L.Var(p.name, p.dtype)
                self.scalars[p.name] = var
                params.append(var)
            elif not p.sparse:
                buf = L.Buffer(p.name, p.dtype, tuple(_sym(d) for d in p.shape))
                self.buffers[p.name] = buf
                params.append(buf)
            elif p.pattern_of:
                src = self.buffers[stored_values(p.pattern_of)]
                buf = L.Buffer(stored_values(p.name), p.dtype, src.shape)
                self.buffers[buf.name] = buf
                params.append(buf)
            else:
                names = p.format.buffer_names(p.name)
                index_dtypes = self.opts.index_dtypes or ("int32",) * (len(names) - 1)
                for name, dtype in zip(names, (*index_dtypes, p.dtype)):
                    buf = L.Buffer(name, dtype, (_sym(f"{name}_len"),))
                    self.buffers[name] = buf
                    params.append(buf)
                for dim in p.shape:
                    if dim not in bound:
                        params.append(L.Var(dim, "int64"))
                        bound.add(dim)
        return tuple(params)

    def _stageable(self, access: K.KAccess) -> bool:
        p = self.kernel.param(access.tensor)
        if p.sparse or self.token is None or self.token not in access.indices or len(access.indices) < 2:
            return False
        if access.tensor in self.opts.no_stage:
            return False
        return self.opts.stage is None or access.tensor in self.opts.stage

    def stage(self, body: K.KExpr, lane: L.Var, token_last: bool = True) -> list[L.Stmt]:
        """Copy each stageable input's token tile into ``<X>_t[other dims..., tile]`` (token last);
        not ``token_last``: only the inputs whose token index is not already last."""
        stmts: list[L.Stmt] = []
        tile = self.opts.tile
        for access in K.accesses(body):
            if access.tensor in self.staged or not self._stageable(access):
                continue
            if not token_last and access.indices[-1] == self.token:
                continue
            src = self.buffers[access.tensor]
            others = [i for i in access.indices if i != self.token]
            staged = L.Buffer(tile_copy(access.tensor), src.dtype, (*[self.extents[i] for i in others], L.const(tile)))
            self.staged[access.tensor] = staged
            if len(others) == 1:
                indices, other = access.indices, others[0]
                copy = self.blocked(
                    other,
                    self._staging_loop(),
                    lambda env, src=src, indices=indices: L.load(src, *[env[i] for i in indices]),
                    lambda env, other=other: (env[other], lane),
                    staged,
                    clamp=True,
                )
            else:
                env = {i: L.Var(f"s_{i}") for i in others}
                env[self.token] = self.clamped_token(lane)
                value = L.load(src, *[env[i] for i in access.indices])
                copy = L.For(lane, L.const(0), L.const(tile), L.Store(staged, (*[env[i] for i in others], lane), value))
                for i in reversed(others):
                    copy = L.For(env[i], L.const(0), self.extents[i], copy)
            stmts += [L.Alloc(staged), copy]
        return stmts

    def _staging_loop(self) -> str:
        """The prefix of the next blocked staging copy's loops: ``s`` (``s_o``, ``s_i``), then
        ``s1``, ``s2``... for the further tensors staged in the same tile (recorded in
        ``staging_loops``, the parallel candidates)."""
        prefix = f"s{len(self.staging_loops)}" if self.staging_loops else "s"
        self.staging_loops.append(f"{prefix}_o")
        return prefix

    def clamped_token(self, lane: L.Var) -> L.Expr:
        """The token index of a lane, clamped into range: lanes past the end compute junk, never stored."""
        tile = self.opts.tile
        m = L.add(L.mul(L.Var(f"{self.token}_o"), L.const(tile)), lane)
        return L.minimum(m, L.sub(self.extents[self.token], L.const(1)))

    def expr(
        self,
        e: K.KExpr,
        env: dict[str, L.Expr],
        leaf: L.Expr,
        lane: list[L.Var],
        clamp: bool,
        acc: L.Expr | None = None,
        dtype: str | None = None,
    ) -> L.Expr:
        """Kernel-IR expression -> loop-IR expression, accesses resolved to buffers, computed in
        ``dtype`` (None: the epilogue's, ``out_dtype``)."""
        dtype = dtype or self.out_dtype
        sparse = self.kernel.sparse_input
        match e:
            case K.KAcc():
                return _cast(acc, dtype)
            case K.KConst(value):
                return L.const(int(value) if dtype in K.INTEGERS else float(value), dtype)
            case K.KScalar(name):
                return _cast(self.scalars[name], dtype)
            case K.KSize(name):
                return _cast(L.SizeVar(name), dtype)
            case K.KAccess(t, indices):
                if sparse is not None and t == sparse.name:
                    return _cast(L.load(self.buffers[stored_values(t)], leaf), dtype)
                if t in self.staged:
                    idx = [env[i] for i in indices if i != self.token]
                    return _cast(L.load(self.staged[t], *idx, lane[0]), dtype)
                idx = [(self.clamped_token(lane[0]) if clamp and i == self.token else env[i]) for i in indices]
                return _cast(L.load(self.buffers[t], *idx), dtype)
            case K.KBin(op, a, b):
                x = self.expr(a, env, leaf, lane, clamp, acc, dtype)
                y = self.expr(b, env, leaf, lane, clamp, acc, dtype)
                return L.Bin(op, x, y)
            case K.KCall(func, args):
                return _call(func, [self.expr(a, env, leaf, lane, clamp, acc, dtype) for a in args])
        raise AssertionError(e)

    def blocked(self, other: str, prefix: str, value_of, target_of, target: L.Buffer, clamp: bool) -> L.Stmt:
        """A blocked transpose between a [other, tile] buffer and a token-indexed 2-d tensor:
        ``for <p>_o: for lane: for <p>_i in 16`` so both sides move whole cache lines (a column
        walk with a power-of-two row stride would alias in the cache). ``value_of(env)`` is what to
        store and ``target_of(env)`` where, in ``target``; lanes past the last token are clamped
        (``clamp``) or skipped."""
        tile, token = self.opts.tile, self.token
        outer, inner, lane = L.Var(f"{prefix}_o"), L.Var(f"{prefix}_i"), L.Var(f"{token}_i")
        w = L.add(L.mul(outer, L.const(BLOCK)), inner)
        m = L.add(L.mul(L.Var(f"{token}_o"), L.const(tile)), lane)
        env = {other: w, token: self.clamped_token(lane) if clamp else m}
        guard = L.Bin("<", w, self.extents[other])
        if not clamp:
            guard = L.Bin("and", L.Bin("<", m, self.extents[token]), guard)
        store = L.If(guard, L.Store(target, tuple(target_of(env)), _cast(value_of(env), target.dtype)))
        body = L.For(lane, L.const(0), L.const(tile), L.For(inner, L.const(0), L.const(BLOCK), store))
        return L.For(outer, L.const(0), L.ceildiv(self.extents[other], BLOCK), body)

    def tile_out(self, other: str, value_of) -> L.Stmt:
        """Write a [other, tile] result to the 2-d output, in blocks along ``other``."""
        indices, out = self.kernel.indices, self.buffers[self.kernel.output.name]
        return self.blocked(other, "w", value_of, lambda env: [env[i] for i in indices], out, clamp=False)

    def rows(self, stmts: tuple[K.Let, ...]) -> list[L.Stmt]:
        """The row-wise statements of one token tile, the output's last: each intermediate a tile
        buffer registered in ``staged`` (read like a staged input: ``[row, lane]`` or ``[lane]``),
        a reduction over the row accumulated lane by lane, then its epilogue applied in place."""
        token, row = self.kernel.indices[0], self.kernel.row
        tile, lane = self.opts.tile, L.Var(f"{token}_i")
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
            shape = (self.extents[row], L.const(tile)) if whole else (L.const(tile),)
            buf = L.Buffer(tile_copy(name), ACC_DTYPE, shape)
            out.append(L.Alloc(buf))
            where = (rv, lane) if whole else (lane,)
            if reduction is None:
                store = L.Store(buf, where, self.expr(stmt.value, env, L.const(0), [lane], clamp=True, dtype=ACC_DTYPE))
                out.append(self.each_row(rv, lanes(store)) if whole else lanes(store))
            else:
                term = self.expr(reduction.body, env, L.const(0), [lane], clamp=True, dtype=ACC_DTYPE)
                acc = L.load(buf, lane)
                combined = L.add(acc, term) if reduction.op == "sum" else L.Bin("max", acc, term)
                out.append(lanes(L.Store(buf, (lane,), L.const(_IDENTITY[reduction.op], ACC_DTYPE))))
                out.append(self.each_row(rv, lanes(L.Store(buf, (lane,), combined))))
                if epilogue != K.KAcc():
                    final = self.expr(epilogue, env, L.const(0), [lane], clamp=True, acc=acc, dtype=ACC_DTYPE)
                    out.append(lanes(L.Store(buf, (lane,), final)))
            self.staged[name] = buf
        if last.indices[1] != row:
            return [*out, *self.row_sum(last, row)]
        tile_buf = self.out_tile
        if tile_buf is not None and tile_buf.dtype == ACC_DTYPE and self._in_place(last):
            # the output's values a vector of tokens at a time, in place in the tile, then the
            # plain transpose out (computed inside the transpose, each value took a strided read)
            rv = L.Var(f"{row}_{last.target.name}")
            value = self.expr(last.value, {token: m, row: rv}, L.const(0), [lane], clamp=True, dtype=ACC_DTYPE)
            out.append(self.each_row(rv, lanes(L.Store(tile_buf, (rv, lane), value))))
            out.append(self.tile_out(row, lambda env: L.load(tile_buf, env[row], lane)))
        else:
            out.append(self.tile_out(row, lambda env: self.expr(last.value, env, L.const(0), [lane], clamp=False)))
        return out

    def _in_place(self, last: K.Let) -> bool:
        """Whether ``last`` reads the output tile only where it writes it (``[token, row]``), so its
        values can replace the tile's row by row."""
        token, row = self.kernel.indices[0], self.kernel.row
        return all(
            a.indices == (token, row) for a in K.accesses(last.value) if self.staged.get(a.tensor) is self.out_tile
        )

    def each_row(self, rv: L.Var, body: L.Stmt) -> L.Stmt:
        """``body`` for every row ``rv`` of a token tile (a masked kernel: the mask's stored ones)."""
        return L.For(rv, L.const(0), self.extents[self.kernel.row], body)

    def row_sum(self, last: K.Let, row: str) -> list[L.Stmt]:
        """The output statement ``O[t, c] = epilogue(sum(r) body)`` of a token tile: ``columns``
        columns ``c`` at a time (then the rest one by one), for each part of ``part`` lanes
        (``_column_tile``), the rows summed into a register accumulator ``acc_r[columns, part]``
        (each row's tile entries loaded once for all the columns), the epilogue applied into
        ``acc_o[c, tile]``, which is then written out in blocks."""
        token, col = last.indices
        lane, extent = L.Var(f"{token}_i"), self.extents[col]
        cols = L.Buffer(ROW_OUT, ACC_DTYPE, (extent, L.const(self.opts.tile)))
        columns, part = self._column_tile()
        done = L.mul(L.floordiv(extent, L.const(columns)), L.const(columns))
        out = self.buffers[self.kernel.output.name]
        write = self.blocked(
            col, "w", lambda env: L.load(cols, env[col], lane), lambda env: (env[token], env[col]), out, clamp=False
        )
        return [
            L.Alloc(cols),
            self._columns(last, row, cols, L.const(0), L.floordiv(extent, L.const(columns)), columns, part),
            self._columns(last, row, cols, done, L.sub(extent, done), 1, part),
            write,
        ]

    def _column_tile(self) -> tuple[int, int]:
        """``row_sum``'s register tile, ``(columns, part)``: parts of the token tile as wide as half
        the register lanes allow (the whole tile on AVX-512, 32 lanes on AVX2), then as many columns
        as fill them (up to ``MAX_COLUMNS``): 4 x 64 lanes in 16 zmm, 2 x 32 in 8 ymm."""
        tile, lanes = self.opts.tile, self.opts.register_lanes
        part = tile if 2 * tile <= lanes or tile % (lanes // 2) != 0 else lanes // 2
        return max(1, min(MAX_COLUMNS, lanes // part)), part

    def _columns(
        self, last: K.Let, row: str, cols: L.Buffer, base: L.Expr, count: L.Expr, width: int, part: int
    ) -> L.Stmt:
        """``count`` groups of ``width`` output columns from ``base``, summed over the rows into ``cols``."""
        token, col = last.indices
        tile = self.opts.tile
        reduction, epilogue = K.split_reduction(last.value)
        co, ci, rv = L.Var(f"{col}_o"), L.Var(f"{col}_i"), L.Var(f"{row}_{last.target.name}")
        h, lv_ = L.Var(f"{token}_h"), L.Var(f"{token}_l")
        lane = L.add(L.mul(h, L.const(part)), lv_)
        c = L.add(L.add(base, L.mul(co, L.const(width))), ci)
        env = {token: self.clamped_token(lane), row: rv, col: c}
        acc = L.Buffer(ROW_SUM, ACC_DTYPE, (L.const(width), L.const(part)))
        term = self.expr(reduction.body, env, L.const(0), [lane], clamp=True, dtype=ACC_DTYPE)
        final = self.expr(epilogue, env, L.const(0), [lane], clamp=True, acc=L.load(acc, ci, lv_), dtype=ACC_DTYPE)

        def each(store: L.Stmt) -> L.Stmt:
            inner = L.For(lv_, L.const(0), L.const(part), store, L.LoopKind.VECTORIZED)
            return L.For(ci, L.const(0), L.const(width), inner, L.LoopKind.UNROLLED)

        group = L.seq(
            L.Alloc(acc),
            each(L.Store(acc, (ci, lv_), L.const(0.0, ACC_DTYPE))),
            self.each_row(rv, each(L.Store(acc, (ci, lv_), L.add(L.load(acc, ci, lv_), term)))),
            each(L.Store(cols, (c, lane), final)),
        )
        return L.For(co, L.const(0), count, L.For(h, L.const(0), L.const(tile // part), group))


_IDENTITY = {"sum": 0.0, "max": -math.inf}


class _Rows(_Lowering):
    """A row-wise kernel without a product (a softmax of a dense input): its statements in a loop
    over token tiles."""

    def __init__(self, kernel: K.Kernel, opts: LowerOptions):
        super().__init__(kernel, opts, _statement_extents(kernel), kernel.indices[0])

    def function(self) -> L.LoopFunc:
        token, tile = self.token, self.opts.tile
        body = self.rows(self.kernel.statements)
        tiles = L.For(L.Var(f"{token}_o"), L.const(0), L.ceildiv(self.extents[token], tile), L.seq(*body))
        func = L.LoopFunc(self.kernel.name, self.params, tiles)
        func.meta.update(_rows_meta(self, "rows", ["w_o", f"{token}_o"]))
        return func


class _Pointwise(_Lowering):
    """A statement without a sum over dense inputs only (``Q[m, k] = X[m, k] * s[m]``): one pass
    over the output in its own order, the first index's rows in parallel and the last index in
    vectors of ``POINTWISE_LANES`` (its tail in a scalar loop), every input read in place: no tile
    to stage and none to write back, which a copy-sized kernel would spend most of its time on."""

    def __init__(self, kernel: K.Kernel, opts: LowerOptions):
        super().__init__(kernel, opts, _statement_extents(kernel), None)
        self.out_dtype = _epilogue_dtype(kernel)

    def function(self) -> L.LoopFunc:
        kernel = self.kernel
        *outer, last = kernel.indices
        out = self.buffers[kernel.output.name]
        lanes, extent = L.const(POINTWISE_LANES), self.extents[last]

        def store(position: L.Expr) -> L.Stmt:
            env: dict[str, L.Expr] = {i: L.Var(i) for i in outer}
            env[last] = position
            value = self.expr(kernel.value, env, L.const(0), [], clamp=False)
            return L.Store(out, tuple(env[i] for i in kernel.indices), _cast(value, out.dtype))

        count = L.floordiv(extent, lanes)
        whole = L.mul(count, lanes)
        o, i = L.Var(f"{last}_o"), L.Var(f"{last}_i")
        vector = L.For(i, L.const(0), lanes, store(L.add(L.mul(o, lanes), i)), L.LoopKind.VECTORIZED)
        vectors = L.For(o, L.const(0), count, vector)
        tail = L.For(L.Var(last), whole, L.sub(extent, whole), store(L.Var(last)))
        body: L.Stmt = L.seq(vectors, tail)
        for index in reversed(outer):
            body = L.For(L.Var(index), L.const(0), self.extents[index], body)
        func = L.LoopFunc(kernel.name, self.params, body)
        func.meta.update(mode="pointwise", parallel=[outer[0] if outer else o.name])
        return func


class _Masked(_Lowering):
    """A row-wise kernel whose first statement is sampled at a mask's stored positions
    (block-sparse attention: ``s[t, j] = sum(d) Q[t, d] * K[j, d] * A[t, j]``, ``A`` in BSR(bq,
    bk)): one token tile per block row of the mask (its first level, ``t / bq: dense``; the lanes
    are its ``t % bq: dense`` level; CSR: one token a tile), every loop over the rows of a tile
    (the first statement's, the reductions', the output's sum) runs over the row's stored
    positions only, and the mask's value multiplies the first statement's sum once, before its
    epilogue."""

    def __init__(self, kernel: K.Kernel, opts: LowerOptions):
        first, sparse = kernel.lets[0], kernel.sparse_input
        fmt = sparse.format
        if fmt is None:
            raise SdslSemanticError(f"kernel '{kernel.name}' needs a format for '{sparse.name}'", kernel.span)
        token, row = first.indices
        dims = _sparse_access(first.value, kernel).indices
        on_token = [l for l, m in enumerate(fmt.maps) if dims[m.dim] == token]
        lane_level = on_token[1] if len(on_token) == 2 else None  # none: a tile of one token (CSR)
        ops = tuple(fmt.maps[l].op for l in on_token)
        if not (
            on_token[0] == 0
            and all(isinstance(fmt.levels[l], lv.Dense) for l in on_token)
            and ops in ((None,), (None, "%"), ("/", "%"))
        ):
            raise SdslSemanticError(
                f"kernel '{kernel.name}' computes its rows one block row of '{sparse.name}' at a time: its format "
                f"must store the token '{token}' as '{token} / b: dense' first and '{token} % b: dense' below it "
                f"(BSR(b, c); or '{token}: dense' first, CSR), not as {fmt.label}",
                kernel.span,
            )
        if kernel.indices[1] == row:
            raise SdslSemanticError(
                f"kernel '{kernel.name}' computes its rows at the stored positions of '{sparse.name}' only: its "
                f"output sums them (index it [{token}, c], not [{token}, {row}])",
                kernel.span,
            )
        super().__init__(kernel, replace(opts, tile=fmt.maps[0].factor), _statement_extents(kernel), token)
        self.fmt, self.dims, self.lane_level = fmt, dims, lane_level
        self._levels()

    def _levels(self) -> None:
        """The mask's level loops under the tile loop (``tile_loop``, its first level), the lane
        level's loop dropped (its coordinate is the lane): ``row_nest``, the row ``row_index`` and
        the stored value's ``position`` in terms of their variables."""
        sparse, position = self.kernel.sparse_input, L.const(0)
        coords: list[L.Expr] = []
        self.row_nest: list[L.Stmt] = []
        for l, (lvl, m) in enumerate(zip(self.fmt.levels, self.fmt.maps)):
            index = self.dims[m.dim]
            bufs = {suffix: self.buffers[f"{sparse.name}_{l}_{suffix}"] for suffix in lvl.buffers()}
            name = {0: f"{index}_o", self.lane_level: f"{index}_i"}.get(l, _part_name(index, m))
            it = lvl.iterate(position, m.extent(self.extents[index]), bufs, name)
            coord = it.coordinate
            if l == 0:
                self.tile_loop = it.loop
            elif l != self.lane_level:
                if it.loop is not None:
                    self.row_nest.append(it.loop)
                if not isinstance(coord, L.Var):
                    cvar = L.Var(f"{_part_name(index, m)}_c")
                    self.row_nest.append(L.Let(cvar, coord))
                    coord = cvar
            coords.append(coord)
            position = it.position
        self.position = position
        self.row_index = self.fmt.to_index(coords)[self.dims.index(self.kernel.row)]

    def each_row(self, rv: L.Var, body: L.Stmt) -> L.Stmt:
        return _wrap(self.row_nest, L.seq(L.Let(rv, self.row_index), body))

    def function(self) -> L.LoopFunc:
        kernel, token, tile = self.kernel, self.token, self.opts.tile
        first, sparse = kernel.lets[0], kernel.sparse_input
        row, lane = kernel.row, L.Var(f"{token}_i")
        reduction, epilogue = K.split_reduction(first.value)
        body = _without(reduction.body, sparse.name)
        rv = L.Var(f"{row}_{first.target.name}")
        env: dict[str, L.Expr] = {token: self.clamped_token(lane), row: rv, **{i: L.Var(i) for i in reduction.indices}}
        acc = L.Buffer(ACC, ACC_DTYPE, (L.const(tile),))
        scores = L.Buffer(tile_copy(first.target.name), ACC_DTYPE, (self.extents[row], L.const(tile)))

        def lanes(store: L.Stmt) -> L.Stmt:
            return L.For(lane, L.const(0), L.const(tile), store, L.LoopKind.VECTORIZED)

        stage = self.stage(body, lane)
        update: L.Stmt = lanes(
            L.Store(
                acc, (lane,), L.add(L.load(acc, lane), self.expr(body, env, L.const(0), [lane], True, dtype=ACC_DTYPE))
            )
        )
        for i in reversed(reduction.indices):
            update = L.For(L.Var(i), L.const(0), self.extents[i], update)
        sampled = L.mul(
            L.load(acc, lane), _cast(L.load(self.buffers[stored_values(sparse.name)], self.position), ACC_DTYPE)
        )
        value = self.expr(epilogue, env, self.position, [lane], True, acc=sampled, dtype=ACC_DTYPE)
        per_row = L.seq(
            L.Alloc(acc),
            lanes(L.Store(acc, (lane,), L.const(0.0, ACC_DTYPE))),
            update,
            lanes(L.Store(scores, (rv, lane), value)),
        )
        self.staged[first.target.name] = scores
        rest = self.rows(kernel.statements[1:])
        tiles = L.with_body(self.tile_loop, L.seq(*stage, L.Alloc(scores), self.each_row(rv, per_row), *rest))
        func = L.LoopFunc(kernel.name, self.params, tiles)
        func.meta.update(_rows_meta(self, "masked", [f"{token}_o"]))
        return func


class _Nest(_Lowering):
    """One statement by level iteration: the sparse input's level loops (``levels``), the sum into
    the accumulator (``accumulation``), its write-out through the epilogue (``writeout``),
    assembled per token tile (``function``). ``rowwise``: the statement is a row-wise kernel's
    first; its results stay in the output tile for the statements after it."""

    def __init__(self, kernel: K.Kernel, opts: LowerOptions, rowwise: bool = False):
        self.rowwise = rowwise
        reduction, epilogue = K.split_reduction(kernel.value)
        self.reduction = reduction
        self.body = reduction.body if reduction else kernel.value
        self.epilogue = epilogue if reduction else K.KAcc()
        self.red_idx = reduction.indices if reduction else ()
        sparse = self.sparse = kernel.sparse_input
        if sparse is not None and sparse.format is None:
            raise SdslSemanticError(f"kernel '{kernel.name}' needs a format for '{sparse.name}'", kernel.span)
        s_access = next((a for a in K.accesses(self.body) if sparse and a.tensor == sparse.name), None)
        # frontend/check.py decides: a dense output reads the sparse input as a factor of its sum
        assert sparse is None or kernel.output.pattern_of or (reduction is not None and s_access is not None)
        self.s_idx: tuple[str, ...] = () if sparse is None else s_access.indices if s_access else kernel.indices
        self.pattern = kernel.output.pattern_of is not None
        extents: dict[str, L.Expr] = {}
        # the output last: a row-wise kernel's first statement is indexed [t, r], its output maybe [t, c]
        for a in [*K.accesses(kernel.value), K.KAccess(kernel.output.name, kernel.indices)]:
            for idx, dim in zip(a.indices, kernel.param(a.tensor).shape):
                extents.setdefault(idx, _sym(dim))
        self.dense_free = [i for i in kernel.indices if i not in self.s_idx]
        self.dense_red = [i for i in self.red_idx if i not in self.s_idx]
        super().__init__(kernel, opts, extents, self.dense_free[0] if self.dense_free else None)
        self.sum_dtype = _sum_dtype(kernel, self.body)
        self.out_dtype = _epilogue_dtype(kernel)

        self.fmt: Format | None = sparse.format if sparse else None
        levels = self.fmt.levels if self.fmt else ()
        self.maps = maps = self.fmt.maps if self.fmt else ()
        self.level_idx = [self.s_idx[m.dim] for m in maps]
        reduced = [i in self.red_idx for i in self.level_idx]
        self.first_red = first_red = reduced.index(True) if True in reduced else len(levels)
        below = range(first_red, len(levels))
        self.gather = self.pattern or (
            all(isinstance(lvl, lv.Dense) for lvl in levels[:first_red])
            and all(reduced[l] or (isinstance(levels[l], lv.Dense) and maps[l].op == "%") for l in below)
        )
        self.free_below = [l for l in below if not reduced[l]] if self.gather else []
        self.tile = opts.tile if self.token else 1
        self.lane = [L.Var(f"{self.token}_i")] if self.token else []
        self.other = [i for i in kernel.indices if i != self.token]

        # Accumulator: gather -> [free levels below the reduction..., tile]; scatter -> output tile.
        if self.gather:
            acc_dims = [L.const(maps[l].factor) for l in self.free_below]
            self.acc_names = [f"{_part_name(self.level_idx[l], maps[l])}" for l in self.free_below]
        else:
            acc_dims = [extents[i] for i in self.other]
            self.acc_names = list(self.other)
        # TVM's LLVM backend puts small constant-size "global" allocations on the stack (LLVM then
        # keeps them in registers); "local" ones go through TVMBackendAllocWorkspace on every entry.
        shape = (*acc_dims, L.const(self.tile)) if self.token else tuple(acc_dims) or (L.const(1),)
        self.acc = L.Buffer(ACC, self.sum_dtype, shape)
        self.block = self._block()
        self._levels()

    def _block(self) -> int | None:
        """With K-blocking, how many coordinates of the first summed level a block spans (checked:
        a gathering kernel with an output tile to carry the partial sums, blocking the index that
        level stores whole or divided, ``k`` or ``k / 4``, by a multiple of the divisor)."""
        block, kernel = self.opts.block, self.kernel
        if block is None:
            return None
        what = f"cannot block the sum of kernel '{kernel.name}'"
        has_tile = self.token is not None and not self.pattern and len(self.other) == 1 and not self.opts.gpu
        if not (self.gather and has_tile and self.first_red < len(self.maps)):
            raise ScheduleError(
                f"{what}: the partial sums of a block are carried in the output tile [row, token tile] of a "
                "product that gathers each output row from the sparse input's rows (CSR, N:M, ELL, BSR) into a "
                "2-d output on the CPU; this kernel has none",
                block.span,
            )
        m, index = self.maps[self.first_red], self.level_idx[self.first_red]
        if block.index is not None and block.index != index:
            raise ScheduleError(
                f"{what} over '{block.index}': the sparse input's first summed level stores '{index}' "
                "(block that index)",
                block.span,
            )
        if m.op == "%":
            raise ScheduleError(
                f"{what}: its first summed level stores {index} % {m.factor}, which no block of '{index}' bounds",
                block.span,
            )
        if self.sum_dtype != self.out_dtype:
            raise ScheduleError(
                f"{what}: its partial sums ({self.sum_dtype}) would be carried in an output tile of {self.out_dtype}",
                block.span,
            )
        span = m.factor if m.op == "/" else 1
        if block.index is None:
            return max(block.size // span, 1)
        if block.size % span:
            raise ScheduleError(
                f"{what} by {block.size}: the format stores {index} / {span}, so a block must be a multiple of {span}",
                block.span,
            )
        return block.size // span

    def _levels(self) -> None:
        """The level loops, from the outside in (``nest``: loops and lets, outermost first), each
        level's coordinate (``coord_env``), the leaf position, and every index as an expression
        (``index_env``); the accumulator lives from ``alloc_depth`` on (gather: the first reduced
        level)."""
        self.coord_env: dict[int, L.Expr] = {}
        self.coordinate_bounds: dict[str, int] = {}
        self.sorted_rows: tuple[str, str] | None = None
        self.nest: list[L.Stmt] = []
        self.position: L.Expr = L.const(0)
        alloc_depth = None
        levels = self.fmt.levels if self.fmt else ()
        for l, (lvl, m) in enumerate(zip(levels, self.maps)):
            if l == self.first_red and self.gather:
                alloc_depth = len(self.nest)
            name = _part_name(self.level_idx[l], m)
            extent = m.extent(self.extents[self.level_idx[l]])
            bufs = {suffix: self.buffers[f"{self.sparse.name}_{l}_{suffix}"] for suffix in lvl.buffers()}
            if l == self.first_red and self.block is not None:
                # at least one block, which writes the output tile even when the sum is empty
                self.block_var = L.Var(f"{name}_b")
                self.blocks = L.Bin("max", L.ceildiv(extent, self.block), L.const(1))
                start = L.mul(self.block_var, L.const(self.block))
                it = lvl.iterate_range(self.position, extent, bufs, name, start, self.block)
                if it is None:
                    raise ScheduleError(
                        f"cannot block the sum of kernel '{self.kernel.name}': the {lvl.describe()} level of "
                        f"{self.fmt.label} stores '{self.level_idx[l]}' at positions that only a search would bound "
                        "per block; blocking needs a level whose positions are affine in it (dense: N:M, VNM)",
                        self.opts.block.span,
                    )
            else:
                it = lvl.iterate(self.position, extent, bufs, name)
            if it.loop is not None:
                self.nest.append(it.loop)
            coord = it.coordinate
            if not isinstance(coord, L.Var):
                cvar = L.Var(f"{name}_c")
                self.nest.append(L.Let(cvar, coord))
                coord = cvar
                if isinstance(extent, L.Const):  # a validated structure's coordinates are below it
                    self.coordinate_bounds[cvar.name] = extent.value
                if l == 0 and lvl.sorted and not self.gather and self.level_idx[0] in self.acc_names:
                    self.sorted_rows = (name, cvar.name)  # the output rows a scatter sums into, in order
            self.coord_env[l] = coord
            self.position = it.position
        self.alloc_depth = alloc_depth if alloc_depth is not None else len(self.nest) if self.gather else 0
        self.index_env: dict[str, L.Expr] = {}
        if self.fmt is not None:
            for d, value in enumerate(self.fmt.to_index([self.coord_env[l] for l in range(len(levels))])):
                self.index_env[self.s_idx[d]] = value
        self.index_env.update({i: L.Var(i) for i in self.dense_red})
        for i in self.dense_free:
            tile_start = L.mul(L.Var(f"{self.token}_o"), L.const(self.tile))
            self.index_env[i] = L.Var(i) if i != self.token else L.add(tile_start, self.lane[0])

    def _accumulation(self) -> L.Stmt:
        """The innermost sum into the accumulator, inside the levels below ``alloc_depth``."""
        acc, lane = self.acc, self.lane
        if self.gather:
            acc_index = [self.coord_env[l] for l in self.free_below]
        else:
            acc_index = [self.index_env[i] for i in self.other]
        acc_index = [*acc_index, *lane] if self.token else acc_index or [L.const(0)]
        value = self.expr(self.body, self.index_env, self.position, lane, clamp=True, dtype=self.sum_dtype)
        update: L.Stmt = L.Store(acc, tuple(acc_index), L.add(L.load(acc, *acc_index), _cast(value, self.sum_dtype)))
        if self.token:
            update = L.For(lane[0], L.const(0), L.const(self.tile), update, L.LoopKind.VECTORIZED)
        for i in reversed(self.dense_red):
            update = L.For(L.Var(i), L.const(0), self.extents[i], update)
        return _wrap(self.nest[self.alloc_depth :], update)

    def _writeout(self, carry: str | None = None) -> L.Stmt:
        """Apply the epilogue to the accumulator and store it to the output (guarding the tile
        tail), or to the output tile. K-blocking carries the partial sums of a block in the output
        tile, without the epilogue: ``carry="out"`` stores the accumulator there, ``"in"`` loads it
        back for the next block."""
        out, token, lane = self.kernel.output, self.token, self.lane
        env = dict(self.index_env)
        loops: list[tuple[L.Var, L.Expr]] = []
        if self.gather:
            coords = dict(self.coord_env)
            acc_index = []
            for l in self.free_below:
                v = L.Var(f"w_{_part_name(self.level_idx[l], self.maps[l])}")
                coords[l] = v
                acc_index.append(v)
                loops.append((v, L.const(self.maps[l].factor)))
            if self.fmt is not None:
                for d, value in enumerate(self.fmt.to_index([coords[l] for l in range(len(self.maps))])):
                    env[self.s_idx[d]] = value
        else:
            acc_index = [L.Var(f"w_{name}") for name in self.acc_names]
            for name, v in zip(self.acc_names, acc_index):
                env[name] = v
                loops.append((v, self.extents[name]))
        if token:
            acc_index.append(lane[0])
        acc_value = L.load(self.acc, *(acc_index or [L.const(0)]))
        # into the output tile, lanes past the last token are computed too: their reads must be clamped
        clamp = self.out_tile is not None
        value = _cast(self.expr(self.epilogue, env, self.position, lane, clamp=clamp, acc=acc_value), out.dtype)
        if carry == "out":
            store: L.Stmt = L.Store(self.out_tile, (env[self.other[0]], lane[0]), acc_value)
        elif carry == "in":
            store = L.Store(self.acc, acc_value.indices, L.load(self.out_tile, env[self.other[0]], lane[0]))
        elif out.pattern_of:
            store = L.Store(self.buffers[stored_values(out.name)], (self.position,), value)
        elif self.out_tile is not None:
            store = L.Store(self.out_tile, (env[self.other[0]], lane[0]), _cast(value, self.out_dtype))
        else:
            store = L.Store(self.buffers[out.name], tuple(env[i] for i in self.kernel.indices), value)
        if self.out_tile is not None:
            store = L.For(lane[0], L.const(0), L.const(self.opts.tile), store, L.LoopKind.VECTORIZED)
        elif token:
            store = L.If(L.Bin("<", env[token], self.extents[token]), store)
            store = L.For(lane[0], L.const(0), L.const(self.opts.tile), store)
        return L.nest(store, [(v, extent, L.LoopKind.SERIAL) for v, extent in loops])

    def function(self, rows: Callable[[], list[L.Stmt]] | None = None) -> L.LoopFunc:
        """The kernel: per token tile, the staging, the nest (zero, sum, write-out) and the output
        tile's write-out, or ``rows()``, the row-wise statements reading it."""
        token, lane, other, acc = self.token, self.lane, self.other, self.acc
        stage = self.stage(self.body, lane[0]) if token and not self.opts.gpu else []
        reduce_part = self._accumulation()
        # A 2-d output tile is written out in blocks along its other dimension: strided stores of
        # whole token columns alias in the cache.
        blocked = token is not None and not self.pattern and len(other) == 1 and not self.opts.gpu
        if blocked and (self.gather or self.rowwise):
            shape = (self.extents[other[0]], L.const(self.tile))
            self.out_tile = L.Buffer(tile_copy(self.kernel.output.name), self.out_dtype, shape)
            # the epilogue runs a vector of tokens at a time into the output tile: an input indexed
            # [token, row] there (a residual) is staged too, or each vector would be a strided gather
            stage += self.stage(self.epilogue, lane[0], token_last=False)
        zero = _fill(acc, L.const(0, self.sum_dtype), lane[0] if token else None)
        writeout = self._writeout()
        if blocked and not self.gather and not self.rowwise:
            writeout = self.tile_out(other[0], lambda env: self._epilogue(env, [env[other[0]]]))
        plain = [L.For(L.Var(i), L.const(0), self.extents[i], L.seq()) for i in self.dense_free if i != token]
        outer = self.nest[: self.alloc_depth]
        if self.block is not None:  # each block of the sum through every row, partial sums in the output tile
            kb, last = self.block_var, L.sub(self.blocks, L.const(1))
            later, before_last = L.Bin("<", L.const(0), kb), L.Bin("<", kb, last)
            per_row = L.seq(
                L.Alloc(acc),
                L.If(L.Bin("==", kb, L.const(0)), zero),
                L.If(later, self._writeout("in")),
                reduce_part,
                L.If(L.Bin("==", kb, last), writeout),
                L.If(before_last, self._writeout("out")),
            )
            inner = L.For(kb, L.const(0), self.blocks, _wrap(plain, _wrap(outer, per_row)))
            if outer and isinstance(outer[0], L.For):  # row chunks around the blocks: threads take chunks
                row, chunk = outer[0], L.Var(f"{outer[0].var.name}_t")
                start = L.mul(chunk, L.const(BLOCK_ROWS))
                first = replace(row, start=start, extent=L.minimum(L.const(BLOCK_ROWS), L.sub(row.extent, start)))
                blocks = L.For(kb, L.const(0), self.blocks, _wrap(plain, _wrap([first, *outer[1:]], per_row)))
                inner = L.For(chunk, L.const(0), L.ceildiv(row.extent, BLOCK_ROWS), blocks)
        elif self.gather:  # inside the gathered result's tile (a kernel without sparse input: ``for n`` is plain)
            inner = _wrap(plain, _wrap(outer, L.seq(L.Alloc(acc), zero, reduce_part, writeout)))
        else:  # the accumulator is the whole output tile: zeroed once, each plain loop sums into its part
            inner = L.seq(L.Alloc(acc), zero, _wrap(plain, reduce_part), writeout)
        if self.out_tile is not None:
            tile_buf = self.out_tile
            tail = rows() if rows else [self.tile_out(other[0], lambda env: L.load(tile_buf, env[other[0]], lane[0]))]
            inner = L.seq(L.Alloc(tile_buf), inner, *tail)
        if token:
            tiles = L.ceildiv(self.extents[token], self.tile)
            inner = L.For(L.Var(f"{token}_o"), L.const(0), tiles, L.seq(*stage, inner))
        func = L.LoopFunc(self.kernel.name, self.params, inner)
        func.meta.update(self._meta())
        return func

    def _epilogue(self, env, acc_index) -> L.Expr:
        """The output value: the epilogue applied to the accumulator element at ``acc_index``."""
        lane = self.lane
        acc_value = L.load(self.acc, *acc_index, *lane) if lane else L.load(self.acc, *(acc_index or [L.const(0)]))
        value = self.expr(self.epilogue, env, self.position, lane, clamp=False, acc=acc_value)
        return _cast(value, self.kernel.output.dtype)

    def _meta(self) -> dict:
        """What schedules and the runtime read of the lowered kernel. Parallel candidates, best
        first: output row blocks (race-free only when gathering), token tiles."""
        token, outer, inner = self.token, self.nest[: self.alloc_depth], self.nest[self.alloc_depth :]
        rows = [it.var.name for it in outer if isinstance(it, L.For)] if self.gather else []
        if self.block is not None and rows:
            rows[0] = f"{rows[0]}_t"  # the row chunks, around the blocks
        siblings = rows[:1] + self.staging_loops + (["w_o"] if self.out_tile else [])
        kernel = self.kernel
        levels = len(self.fmt.levels) if self.fmt else 0
        summed = self.gather and self.first_red < levels
        return {
            "mode": "gather" if self.gather else "scatter",
            "token": token,
            "token_size": kernel.param(kernel.output.name).shape[kernel.indices.index(token)] if token else None,
            "tile": self.tile,
            "parallel": siblings + ([f"{token}_o"] if token else []),
            "rows": rows[:1],
            "sorted_rows": self.sorted_rows,
            "out_indices": kernel.indices,
            "token_extent": self.extents[token] if token else None,
            "dense_reduction": self.dense_red,
            "sparse_reduction": next((it.var.name for it in inner if isinstance(it, L.For)), None) if summed else None,
            "coordinate_bounds": self.coordinate_bounds,
            "thread_major": _thread_major(
                self.body if self.reduction else None, self.sparse, self.s_idx, self.red_idx, token
            ),
        }


def _batched(kernel: K.Kernel, func: L.LoopFunc) -> L.LoopFunc:
    """A batched kernel from its unbatched one's loop IR: one parallel loop around it over every
    batch element (the batch indices fused, row-major in the first statement's order, and taken
    apart again at the top of its body), each tensor's accesses given its batch indices at their
    own dimensions (``K.Kernel.batch_dims``: ``Q[b, t, h, d]`` is read in place); tile buffers are
    allocated inside the loop, per batch element."""
    extents = [_sym(kernel.output.shape[kernel.indices.index(b)]) for b in kernel.batch]
    dims = {p.name: kernel.batch_dims(p.name) for p in (*kernel.inputs, kernel.output) if p.shape}
    batched = {
        p.name: L.Buffer(p.name, p.dtype, tuple(_sym(d) for d in kernel.param(p.name).shape))
        for p in func.params
        if isinstance(p, L.Buffer) and dims.get(p.name)
    }

    def placed(name: str, indices: tuple[L.Expr, ...]) -> tuple[L.Expr, ...]:
        rest = iter(indices)
        at = dims[name]
        return tuple(L.Var(at[n]) if n in at else next(rest) for n in range(len(indices) + len(at)))

    copies = _batch_copies(kernel, func, dims)

    def rewrite(node):
        if isinstance(node, tuple):
            return tuple(rewrite(x) for x in node)
        if not is_dataclass(node) or isinstance(node, L.Buffer | L.LoopFunc):
            return node
        node = replace(node, **{f.name: rewrite(getattr(node, f.name)) for f in fields(node)})
        if isinstance(node, L.Load) and node.buffer.name in copies:
            return replace(node, buffer=copies[node.buffer.name])
        if isinstance(node, L.Load | L.Store) and node.buffer.name in batched:
            node = replace(node, buffer=batched[node.buffer.name], indices=placed(node.buffer.name, node.indices))
        return node

    body = rewrite(func.body)
    for name, copy in copies.items():  # each strided slice copied once per batch element, compact
        at = tuple(L.Var(f"{name}_{n}") for n in range(len(copy.shape)))
        store = L.Store(copy, at, L.load(batched[name], *placed(name, at)))
        body = L.seq(L.Alloc(copy), L.nest(store, [(v, d, L.LoopKind.SERIAL) for v, d in zip(at, copy.shape)]), body)
    if len(kernel.batch) == 1:
        loop = L.Var(kernel.batch[0])
    else:
        loop = L.Var("_".join(kernel.batch))
        taken = [L.Let(L.Var(b), i) for b, i in zip(kernel.batch, L.unflatten(loop, extents))]
        body = L.seq(*taken, body)
    size = functools.reduce(L.mul, extents)
    params = tuple(batched.get(p.name, p) if isinstance(p, L.Buffer) else p for p in func.params)
    out = L.LoopFunc(kernel.name, params, L.For(loop, L.const(0), size, body, L.LoopKind.PARALLEL))
    out.meta.update(func.meta, parallel=[], out_indices=kernel.indices)
    return out


def _batch_copies(kernel: K.Kernel, func: L.LoopFunc, dims: dict[str, dict[int, str]]) -> dict[str, L.Buffer]:
    """The inputs a batched kernel copies per batch element (name -> its compact local copy): those
    whose slice is strided (a batch index after another dimension: ``K[b, j, h, d]``) and that the
    unbatched nest reads in place, not through a token tile (not indexed by the token). Read over
    and over from rows ``H * D`` apart, such a slice's rows fall into a few cache sets and miss;
    a copy is read from L1."""
    unbatched = kernel.unbatched()
    token = unbatched.indices[0]
    tiled = {a.tensor for s in unbatched.statements for a in K.accesses(s.value) if token in a.indices}
    strided = {
        name for name, at in dims.items() if at and sorted(at) != list(range(len(at))) and name != kernel.output.name
    }
    return {
        p.name: L.Buffer(batch_copy(p.name), p.dtype, p.shape)
        for p in func.params
        if isinstance(p, L.Buffer) and p.name in strided - tiled
    }


def _statement_extents(kernel: K.Kernel) -> dict[str, L.Expr]:
    """Every index of a kernel's statements -> its extent, from the tensors it indexes."""
    extents: dict[str, L.Expr] = {}
    for stmt in kernel.statements:
        for a in [K.KAccess(stmt.target.name, stmt.indices), *K.accesses(stmt.value)]:
            for idx, dim in zip(a.indices, kernel.param(a.tensor).shape):
                extents.setdefault(idx, _sym(dim))
    return extents


def _pointwise(kernel: K.Kernel, opts: LowerOptions) -> bool:
    """Whether a kernel is one statement over dense inputs without a sum (``_Pointwise``), on a CPU."""
    dense = kernel.sparse_input is None and not kernel.output.sparse
    return dense and not opts.gpu and not kernel.rowwise and K.split_reduction(kernel.value)[0] is None


def _masked(kernel: K.Kernel) -> bool:
    """Whether a row-wise kernel samples its first statement at a sparse input's stored positions."""
    first = kernel.lets[0]
    return kernel.sparse_input is not None and kernel.indices[0] in _sparse_access(first.value, kernel).indices


def _sparse_access(value: K.KExpr, kernel: K.Kernel) -> K.KAccess:
    """The sparse input's access in a statement (frontend/check.py: at most one)."""
    return next(a for a in K.accesses(value) if a.tensor == kernel.sparse_input.name)


def _without(e: K.KExpr, tensor: str) -> K.KExpr:
    """A product with ``tensor``'s factor (frontend/check.py: a factor of it) replaced by 1."""
    match e:
        case K.KAccess(t, _) if t == tensor:
            return K.KConst(1.0)
        case K.KBin("*", a, b):
            return K.KBin("*", _without(a, tensor), _without(b, tensor))
        case K.KBin("/", a, b):
            return K.KBin("/", _without(a, tensor), b)
    return e


def _rows_meta(lowering: _Lowering, mode: str, parallel: list[str]) -> dict:
    """What schedules and the runtime read of a row-wise kernel without a level nest of its own."""
    kernel, token = lowering.kernel, lowering.token
    return {
        "mode": mode,
        "token": token,
        "token_size": kernel.output.shape[0],
        "tile": lowering.opts.tile,
        "parallel": parallel,
        "rows": [],
        "out_indices": kernel.indices,
        "token_extent": lowering.extents[token],
        "dense_reduction": [],
        "sparse_reduction": None,
        "thread_major": (),
    }


def _epilogue_dtype(kernel: K.Kernel) -> str:
    """What a statement's value is computed in: int32 when it is an integer output of integers
    only, else float32 (a float value stored to an integer output is rounded: ``_cast``)."""
    integer = kernel.output.dtype in K.INTEGERS and _sum_dtype(kernel, kernel.value) == "int32"
    return "int32" if integer else ACC_DTYPE


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
    kinds = [L.LoopKind.SERIAL] * (len(vars_) - 1)
    kinds.append(L.LoopKind.VECTORIZED if isinstance(buf.shape[-1], L.Const) else L.LoopKind.SERIAL)
    return L.nest(L.Store(buf, tuple(vars_), value), list(zip(vars_, buf.shape, kinds)))


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


BLOCK = 16  # floats per cache line: transposes move whole lines on both sides
# K-blocking: row blocks a chunk, each chunk running every block of the sum through its rows; the
# chunks are what threads share (one fork per tile, not per block), each rereading a block from L2
# once per chunk
BLOCK_ROWS = 32
# A row-wise sum into an output [t, c] (attention's P V): at most this many columns of
# accumulators at once (``_Lowering._column_tile``), each row's tile entries loaded once for all
MAX_COLUMNS = 8
