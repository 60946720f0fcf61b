"""Loop IR -> TVM tirx PrimFunc, built with TVM's IR builder (no text templates)."""

from __future__ import annotations

import itertools

from tvm import tirx
from tvm.backend.cuda.op import cuda_atomic_add
from tvm.script.ir_builder import IRBuilder
from tvm.tirx.script.builder import ir as T

from sparsedsl.ir import loop_ir as L
from sparsedsl.ir import windows
from sparsedsl.ir.schedule import cross_thread_sums
from sparsedsl.ir.transposes import shuffles


def _bound(tag: str):
    """A loop bound to a GPU grid or block axis."""
    return lambda lo, hi: T.thread_binding(lo, hi, thread=tag)


_LOOPS = {
    L.LoopKind.SERIAL: T.serial,
    L.LoopKind.PARALLEL: T.parallel,
    L.LoopKind.VECTORIZED: T.vectorized,
    L.LoopKind.UNROLLED: T.unroll,
    **{kind: _bound(kind.value) for kind in (L.LoopKind.BLOCK_X, L.LoopKind.BLOCK_Y, L.LoopKind.THREAD_X)},
}

_BINARY = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
    "//": tirx.floordiv,
    "%": tirx.floormod,
    "min": tirx.min,
    "max": tirx.max,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    "==": tirx.EQ,
    "and": tirx.And,
}


def _exp2i(n):
    """2^n for an integral float n in [-126, 127], from the exponent bits (vectorisable)."""
    bits = tirx.shift_left(tirx.Cast("int32", n) + tirx.const(127, "int32"), tirx.const(23, "int32"))
    return tirx.reinterpret("float32", bits)


def _nearbyint_llvm(x):
    """LLVM's nearbyint (to nearest, ties to even) called directly: TVM's vectoriser widens it,
    where it leaves ``tirx.nearbyint`` scalar and LLVM then gathers and scatters the loop's data."""
    return tirx.call_llvm_pure_intrin(x.ty.dtype, "llvm.nearbyint", x)


_CALLS = {
    "floor": tirx.floor,
    "round_even": tirx.nearbyint,  # to nearest, ties to even (CUDA's rintf)
    "exp2i": _exp2i,
    "sqrt": tirx.sqrt,
    "abs": tirx.abs,
}


class _Emitter:
    def __init__(self, llvm: bool) -> None:
        self.calls = {**_CALLS, "round_even": _nearbyint_llvm} if llvm else _CALLS
        self.vars: dict[str, tirx.Var] = {}
        self.bufs: dict[str, tirx.Buffer] = {}
        self.vector: tuple[tirx.Var, L.Expr, int] | None = None  # the vectorised loop around: var, start, lanes

    def size(self, e: L.Expr):
        return self.expr(e)

    def expr(self, e: L.Expr):
        match e:
            case L.Var(name) | L.SizeVar(name):
                if name not in self.vars:
                    self.vars[name] = tirx.Var(name, e.dtype)
                return self.vars[name]
            case L.Const(value, dtype):
                return tirx.const(value, dtype)
            case L.Bin(op, a, b):
                return _BINARY[op](self.expr(a), self.expr(b))
            case L.Load(buf, idx):
                return self.bufs[buf.name][tuple(self.expr(i) for i in _own(buf, idx))]
            case L.Call(windows.WINDOW):
                return self.window(e)
            case L.Call(func, args, _):
                return self.calls[func](*(self.expr(a) for a in args))
            case L.Cast(dtype, value):
                v = self.expr(value)
                lanes = v.ty.dtype.lanes  # a transposed block's converted vectors (``transpose``)
                return tirx.Cast(dtype if lanes == 1 else f"{dtype}x{lanes}", v)
            case L.Select(c, t, o):
                return tirx.Select(self.expr(c), self.expr(t), self.expr(o))
        raise TypeError(e)

    def stmt(self, s: L.Stmt) -> None:
        match s:
            case L.Seq(stmts):
                for st in stmts:
                    self.stmt(st)
            case L.For(var, start, extent, body, kind):
                lo = self.expr(start)
                hi = self.expr(L.add(start, extent))
                saved, outer = self.vars.get(var.name), self.vector
                with _LOOPS[kind](lo, hi) as v:
                    IRBuilder.name(var.name, v)
                    self.vars[var.name] = v
                    if kind is L.LoopKind.VECTORIZED and isinstance(extent, L.Const):
                        self.vector = (v, start, extent.value)
                    if kind is L.LoopKind.THREAD_X:
                        self.thread_body(body, v)
                    else:
                        self.stmt(body)
                self.vector = outer
                if saved is not None:
                    self.vars[var.name] = saved
            case L.Store(buf, idx, L.Bin("+", L.Load(same, at), value), True) if same == buf and at == idx:
                target = self.bufs[buf.name][tuple(self.expr(i) for i in _own(buf, idx))]
                T.evaluate(cuda_atomic_add(T.address_of(target), self.expr(value)))
            case L.Store(atomic=True):
                raise TypeError(f"an atomic store must add to its own element: {L.stmt_lines(s)[0]}")
            case L.Store(buf, idx, value):
                T.buffer_store(self.bufs[buf.name], self.expr(value), [self.expr(i) for i in _own(buf, idx)])
            case L.Let(var, value):
                v = T.Bind(self.expr(value))
                IRBuilder.name(var.name, v)
                self.vars[var.name] = v
            case L.Alloc(buf):
                shape = [self.expr(d) for d in _own(buf, buf.shape)]
                b = T.alloc_buffer(shape, buf.dtype, scope="local" if buf.scope == "thread" else buf.scope)
                IRBuilder.name(buf.name, b)
                self.bufs[buf.name] = b
            case L.If(cond, then):
                with T.If(self.expr(cond)), T.Then():
                    self.stmt(then)
            case L.TileFill(frag, tile):
                T.evaluate(T.tvm_fill_fragment(self.bufs[frag.name].data, *_WMMA, self.tile(frag, tile), T.float32(0)))
            case L.TileCopy(frag, tile, memory, offset, ld, load):
                copy = T.tvm_load_matrix_sync if load else T.tvm_store_matrix_sync
                ptr, stride = self.span(memory, "r" if load else "w", offset, ld), tirx.Cast("int32", self.expr(ld))
                T.evaluate(copy(self.bufs[frag.name].data, *_WMMA, self.tile(frag, tile), ptr, stride, "row_major"))
            case L.TileMma(c, c_tile, a, a_tile, b, b_tile):
                acc, at = self.bufs[c.name].data, self.tile(c, c_tile)
                args = (self.bufs[a.name].data, self.tile(a, a_tile), self.bufs[b.name].data, self.tile(b, b_tile))
                T.evaluate(T.tvm_mma_sync(acc, at, *args, acc, at))
            case L.Transpose(dst, dst_at, src, src_at, convert):
                self.transpose(dst, dst_at, src, src_at, convert)
            case L.Prefetch(buf, idx):  # a read, into every level, of data (LLVM's operands)
                element = self.bufs[buf.name][tuple(self.expr(i) for i in idx)]
                fetch = tirx.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(element), 0, 3, 1)
                T.evaluate(fetch)
            case _:
                raise TypeError(s)

    def window(self, call: L.Call) -> tirx.PrimExpr:
        """A window read (``ir/windows.py``) in a vectorised loop of a permute's width: written per
        lane, chunk ``j``'s element of the lane and a permute of it by the lane's offset, which TVM's
        vectoriser turns into a contiguous load of the chunk and the permute of the whole vector;
        the chunks after the first take over where a lane's offset reaches them. The plain read
        elsewhere."""
        plain, start, offset, width, dim = windows.window_parts(call)
        dtype = plain.buffer.dtype
        if self.vector is None or (dtype, self.vector[2]) not in windows.PERMUTES:
            return self.expr(plain)
        var, first, lanes = self.vector
        intrinsic = windows.PERMUTES[dtype, lanes][0]
        picks = tirx.Cast("int32", self.expr(offset))
        result = None
        for j in range(-(-width // lanes)):
            at = list(start.indices)
            at[dim] = L.add(at[dim], L.const(j * lanes))
            element = tuple(self.expr(i) for i in at)
            lane = var - self.expr(first)
            chunk = self.bufs[plain.buffer.name][(*element[:dim], element[dim] + lane, *element[dim + 1 :])]
            picked = tirx.call_llvm_pure_intrin(dtype, intrinsic, chunk, picks)
            result = picked if result is None else tirx.Select(picks >= j * lanes, picked, result)
        return result

    def run(self, at: tuple[L.Expr, ...], lanes: int) -> list[tirx.PrimExpr]:
        """The indices of ``lanes`` contiguous elements from ``at`` (a ramp in the last index)."""
        return [*(self.expr(i) for i in at[:-1]), tirx.Ramp(self.expr(at[-1]), tirx.const(1, "int64"), lanes)]

    def transpose(self, dst: L.Buffer, dst_at, src: L.Buffer, src_at, convert: L.Expr | None) -> None:
        """``L.Transpose``: vector loads, the shuffles of ``transposes.shuffles``, ``convert`` of
        each vector (the element bound to it), vector stores."""
        lanes = len(src_at)
        values = {
            f"r{r}": T.Bind(tirx.BufferLoad(self.bufs[src.name], self.run(at, lanes))) for r, at in enumerate(src_at)
        }
        for out, first, second, picks in shuffles():
            picked = [tirx.const(i, "int32") for i in picks]
            values[out] = T.Bind(tirx.Shuffle([values[first], values[second]], picked))
        element = L.element(src.dtype).name
        for c, at in enumerate(dst_at):
            value = values[f"o{c}"]
            if convert is not None:
                self.vars[element] = value
                value = self.expr(convert)
                del self.vars[element]
            T.buffer_store(self.bufs[dst.name], value, self.run(at, lanes))

    def span(self, buf: L.Buffer, access: str, offset: L.Expr, ld: L.Expr) -> tirx.PrimExpr:
        """A pointer to the 16 x 16 block of ``buf`` at ``offset`` (rows ``ld`` apart), with the
        block's own extent (the buffer's would be a size expression TVM hoists to the host)."""
        extent = self.expr(L.add(L.mul(ld, L.const(L.TILE - 1)), L.const(L.TILE)))
        return self.bufs[buf.name].access_ptr(access, ptr_type=buf.dtype, offset=self.expr(offset), extent=extent)

    def tile(self, frag: L.Buffer, tile: tuple[L.Expr, L.Expr]) -> tirx.PrimExpr:
        """The number of a fragment buffer's 16 x 16 tile (row-major over its tiles)."""
        per_row = frag.shape[1].value // L.TILE
        return tirx.Cast("int32", self.expr(L.add(L.mul(tile[0], L.const(per_row)), tile[1])))

    def thread_body(self, body: L.Stmt, thread: tirx.Var) -> None:
        """The body of a ``threadIdx.x`` loop. Sums into local buffers declared outside it
        (``schedule.cross_thread_sums``, checked by ``schedule.set_kind``) become a cross-thread
        reduction: each thread adds into its own zeroed copy, then ``tvm_thread_allreduce`` (warp
        shuffles) combines the copies and every thread adds the total to the accumulator."""
        outer = {n: self.bufs[n] for n in cross_thread_sums(body)}
        parts = {}
        for name, acc in outer.items():
            parts[name] = T.alloc_buffer(acc.shape, acc.dtype, scope="local")
            IRBuilder.name(f"{name}_part", parts[name])
            for idx in _elements(acc):
                T.buffer_store(parts[name], tirx.const(0, acc.dtype), idx)
        self.bufs.update(parts)
        self.stmt(body)
        self.bufs.update(outer)
        for name, acc in outer.items():
            reducer = T.comm_reducer(lambda x, y: x + y, [tirx.const(0, acc.dtype)])
            for idx in _elements(acc):  # a total buffer each: TVM lowers one reduction per buffer
                total = T.alloc_buffer([1], acc.dtype, scope="local")
                IRBuilder.name(f"{name}_total", total)
                with T.attr(reducer, "reduce_scope", T.reinterpret("handle", T.uint64(0))):
                    T.evaluate(T.tvm_thread_allreduce(T.uint32(1), parts[name][idx], True, total[0], thread))
                T.buffer_store(acc, acc[idx] + total[0], idx)


_WMMA = (L.TILE, L.TILE, L.TILE)  # the m, n, k of a tensor-core step


def _own(buf: L.Buffer, indices: tuple) -> tuple:
    """A thread-private buffer is one thread's slice: its first index (the thread) is implicit."""
    return indices[1:] if buf.scope == "thread" else indices


def _elements(buf: tirx.Buffer) -> list[tuple[int, ...]]:
    """Every index of a buffer of constant shape."""
    return list(itertools.product(*(range(int(d)) for d in buf.shape)))


def to_tir(func: L.LoopFunc, llvm: bool = True) -> tirx.PrimFunc:
    """The tirx PrimFunc of a loop-IR function; argument order is ``func.params``. ``llvm``: it is
    built by TVM's LLVM backend (a CPU), which may call LLVM's intrinsics."""
    em = _Emitter(llvm)
    with IRBuilder() as ib, T.prim_func():
        T.func_name(func.name)
        T.func_attr({"tirx.noalias": True, "global_symbol": func.name})
        for p in func.params:
            if isinstance(p, L.Buffer):
                shape = [em.expr(d) for d in p.shape]
                buf = T.arg(p.name, T.buffer(shape, p.dtype))
                em.bufs[p.name] = buf
            elif p.dtype in ("float16", "bfloat16"):  # 16-bit scalars travel as float32 (TVM's calling convention)
                em.vars[p.name] = tirx.Cast(p.dtype, T.arg(p.name, tirx.Var(p.name, "float32")))
            else:
                em.vars[p.name] = T.arg(p.name, tirx.Var(p.name, p.dtype))
        em.stmt(func.body)
    return ib.get()
