"""Shared-memory staging on GPU-mapped loop IR: ``stage X in shared at L``.

At the top of loop ``L``'s body the block's threads copy the box of ``X`` that the body reads into
a shared buffer ``X_s`` (element ``e`` of the box by thread ``e % threads``: consecutive threads,
consecutive addresses), and the body reads ``X_s`` instead. The box comes from the indices: each
must be ``wrap(base + sum(c * v))`` with ``base`` the same for every read, ``v`` loop variables
inside ``L`` with constant extents, ``c >= 0`` constants and ``wrap`` clamps by ``min``/``max``
(the copy applies them too, and zero-fills positions outside ``X``: the body never reads those).

``L`` must run the same iterations in every thread of the block. When it sits directly inside the
thread loop, the thread loop is first split around it (``sink_threads``): what comes before and
after ``L`` gets a thread loop of its own, ``L``'s body gets one inside ``L``, and the buffers the
thread loop declared become thread-private arrays (scope ``thread``, first index the thread) that
each thread keeps across the pieces; on CUDA they are registers (``backends/tvm/tir.py``).

Read as a serial program (``emulate.serial_equivalent``) the result computes what the unstaged kernel
does; on the GPU, TVM's ``ThreadSync`` pass puts ``__syncthreads()`` between the copy and the
reads, and before the next iteration's copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

from sparsedsl.errors import ScheduleError, Span
from sparsedsl.ir import loop_ir as L
from sparsedsl.ir.buffer_names import shared_copy
from sparsedsl.ir.schedule import loops, map_buffer, rewrite_loops

SHARED_BYTES = 48 * 1024  # static shared memory a CUDA block may declare
BYTES = {  # per element
    **{"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int32": 4, "int64": 8},
    **{"int16": 2, "uint16": 2, "int8": 1, "uint8": 1},
}


def _thread_loop(stmts: tuple[L.Stmt, ...]) -> L.For | None:
    return next((f for st in stmts for f in loops(st) if f.kind is L.LoopKind.THREAD_X), None)


def sink_threads(func: L.LoopFunc, name: str, span: Span | None = None) -> L.LoopFunc:
    """Split the thread loop around loop ``name``, a statement directly inside it (see the module
    docstring); ``name`` then runs in every thread alike, with a thread loop inside."""
    found = []

    def sink(loop: L.For) -> L.Stmt | None:
        if loop.kind is not L.LoopKind.THREAD_X:
            return None
        guard, inner = (loop.body.cond, loop.body.then) if isinstance(loop.body, L.If) else (None, loop.body)
        stmts = inner.stmts if isinstance(inner, L.Seq) else (inner,)
        at = next((i for i, st in enumerate(stmts) if isinstance(st, L.For) and st.var.name == name), None)
        if at is None:
            return None
        target, t = stmts[at], loop.var
        if any(isinstance(st, L.Let) for st in stmts):
            raise ScheduleError(f"cannot stage at loop '{name}': the thread loop binds values around it", span)
        if L.uses(target.start, t.name) or L.uses(target.extent, t.name):
            raise ScheduleError(f"cannot stage at loop '{name}': its bounds differ from thread to thread", span)
        lead = []
        body = target.body.stmts if isinstance(target.body, L.Seq) else (target.body,)
        while body and isinstance(body[0], L.Let) and not L.uses(body[0].value, t.name):
            lead, body = [*lead, body[0]], body[1:]
        declared = [st.buffer for st in stmts if isinstance(st, L.Alloc)]
        private = [replace(b, shape=(loop.extent, *b.shape), scope="thread") for b in declared]

        def piece(parts) -> L.Stmt | None:
            s = L.seq(*parts)
            for buf in private:
                s = map_buffer(s, buf.name, buf, lambda idx: (t, *idx))
            if s == L.seq():
                return None
            return replace(loop, body=L.If(guard, s) if guard is not None else s)

        sunk = replace(target, body=L.seq(*lead, piece(body)))
        found.append(name)
        return L.seq(*(L.Alloc(b) for b in private), piece(stmts[:at]), sunk, piece(stmts[at + 1 :]))

    body = rewrite_loops(func.body, sink)
    if not found:
        raise ScheduleError(f"cannot stage at loop '{name}': it is not directly inside the thread loop", span)
    return replace(func, body=body)


def affine(e: L.Expr, inner: dict[str, int]) -> tuple[L.Expr, dict[str, int]] | None:
    """``e`` as ``base + sum(c * v)`` over the variables ``inner``; None when it is not."""
    if not any(L.uses(e, v) for v in inner):
        return e, {}
    match e:
        case L.Var(n) if n in inner:
            return L.const(0), {n: 1}
        case L.Bin("+", a, b):
            left, right = affine(a, inner), affine(b, inner)
            if left and right:
                coefs = dict(left[1])
                for v, c in right[1].items():
                    coefs[v] = coefs.get(v, 0) + c
                return L.add(left[0], right[0]), coefs
        case L.Bin("-", a, b) if not any(L.uses(b, v) for v in inner):
            left = affine(a, inner)
            if left:
                return L.sub(left[0], b), left[1]
        case L.Bin("*", a, L.Const(c)) | L.Bin("*", L.Const(c), a) if isinstance(c, int):
            part = affine(a, inner)
            if part:
                return L.mul(part[0], L.const(c)), {v: k * c for v, k in part[1].items()}
        case L.Cast(dtype, v):
            part = affine(v, inner)
            if part:
                return L.Cast(dtype, part[0]), part[1]
    return None


def unwrap(e: L.Expr, inner: dict[str, int]) -> tuple[tuple[tuple[str, L.Expr], ...], L.Expr]:
    """Peel clamps ``min(x, bound)`` / ``max(x, bound)`` whose bound does not vary inside."""
    wraps = []
    while isinstance(e, L.Bin) and e.op in ("min", "max") and not any(L.uses(e.b, v) for v in inner):
        wraps.append((e.op, e.b))
        e = e.a
    return tuple(wraps), e


def _rewrap(wraps, e: L.Expr) -> L.Expr:
    for op, bound in reversed(wraps):
        e = L.Bin(op, e, bound)
    return e


Box = list[tuple[tuple[tuple[str, L.Expr], ...], L.Expr]]  # per dimension: clamps, base


def box_of(tensor: L.Buffer, body: L.Stmt, span: Span | None) -> tuple[Box, list[int], Callable[[tuple], tuple]]:
    """Per dimension of ``tensor``: the clamps, the base and the extent of what ``body`` reads,
    and a function from a read's indices to its offsets in the box."""
    inner: dict[str, int] = {}
    unbounded: set[str] = set()
    for f in loops(body):
        if isinstance(f.extent, L.Const) and f.start == L.const(0):
            inner[f.var.name] = f.extent.value
        else:
            unbounded.add(f.var.name)
    unbounded |= {s.var.name for s in L.leaves(body) if isinstance(s, L.Let)}
    reads = [e for e in L.loads(body) if e.buffer == tensor]
    if not reads:
        raise ScheduleError(f"cannot stage '{tensor.name}': the loop does not read it", span)
    box = None
    extents = [1] * len(tensor.shape)
    for read in reads:
        shape = []
        for d, index in enumerate(read.indices):
            wraps, core = unwrap(index, inner)
            part = None if any(L.uses(core, v) for v in unbounded) else affine(core, inner)
            if part is None or any(c < 0 for c in part[1].values()):
                raise ScheduleError(
                    f"cannot stage '{tensor.name}': index {L.expr_str(index)} is not an offset plus constant "
                    f"multiples of constant-extent loops inside the staged loop",
                    span,
                )
            shape.append((wraps, part[0]))
            extents[d] = max(extents[d], 1 + sum(c * (inner[v] - 1) for v, c in part[1].items()))
        if box is not None and shape != box:
            raise ScheduleError(f"cannot stage '{tensor.name}': the loop reads it at different offsets", span)
        box = shape

    def offsets(indices):
        out = []
        for index in indices:
            _, core = unwrap(index, inner)
            _, coefs = affine(core, inner)
            offset = L.const(0)
            for v, c in sorted(coefs.items()):
                offset = L.add(offset, L.mul(L.Var(v), L.const(c)))
            out.append(offset)
        return tuple(out)

    return box, extents, offsets


def copy_box(tensor: L.Buffer, staged: L.Buffer, box: Box, extents: list[int], thread: L.For) -> L.Stmt:
    """The block's threads copy the box into ``staged``, element ``e`` by thread ``e % threads``."""
    threads, total = thread.extent.value, math.prod(extents)
    step, t = L.Var(f"{staged.name}_c"), thread.var
    e = L.add(L.mul(step, L.const(threads)), t)
    offsets, stride = [], 1
    for ext in reversed(extents):
        offsets.insert(0, L.mod(L.floordiv(e, L.const(stride)), L.const(ext)))
        stride *= ext
    where = [_rewrap(wraps, L.add(base, o)) for (wraps, base), o in zip(box, offsets)]
    inside = [L.Bin("and", L.Bin("<=", L.const(0), w), L.Bin("<", w, dim)) for w, dim in zip(where, tensor.shape)]
    cond = inside[0]
    for c in inside[1:]:
        cond = L.Bin("and", cond, c)
    zero = L.Store(staged, tuple(offsets), L.const(0.0, staged.dtype))
    copy: L.Stmt = L.seq(zero, L.If(cond, L.Store(staged, tuple(offsets), L.Load(tensor, tuple(where)))))
    if total % threads:
        copy = L.If(L.Bin("<", e, L.const(total)), copy)
    return L.For(step, L.const(0), L.const(-(-total // threads)), replace(thread, body=copy))


def stage_shared(func: L.LoopFunc, tensor: str, name: str, span: Span | None = None) -> L.LoopFunc:
    """``stage tensor in shared at name`` (see the module docstring)."""
    param = next((p for p in func.params if isinstance(p, L.Buffer) and p.name == tensor), None)
    if param is None:
        raise ScheduleError(f"cannot stage '{tensor}': it is not a tensor argument of '{func.name}'", span)
    if any(s.buffer.name == tensor for s in L.stores(func.body)):
        raise ScheduleError(f"cannot stage '{tensor}': the kernel writes it", span)
    targets = [f for f in loops(func.body) if f.var.name == name]
    if not targets:
        names = sorted({f.var.name for f in loops(func.body)})
        raise ScheduleError(f"kernel '{func.name}' has no loop '{name}' (its loops: {', '.join(names)})", span)
    inside_threads = [f for f in loops(func.body) if f.kind is L.LoopKind.THREAD_X and targets[0] in loops(f.body)]
    if inside_threads:
        func = sink_threads(func, name, span)
    staged = L.Buffer(shared_copy(tensor), param.dtype, (), "shared")

    def stage(loop: L.For) -> L.Stmt | None:
        if loop.var.name != name:
            return None
        stmts = loop.body.stmts if isinstance(loop.body, L.Seq) else (loop.body,)
        n = 0
        while n < len(stmts) and isinstance(stmts[n], L.Let):
            n += 1
        lead, rest = stmts[:n], stmts[n:]
        if _thread_loop(rest) is None:
            raise ScheduleError(f"cannot stage at loop '{name}': no thread loop inside it to share the copy", span)
        box, extents, offsets = box_of(param, L.seq(*rest), span)
        size = math.prod(extents) * BYTES[param.dtype]
        if size > SHARED_BYTES:
            raise ScheduleError(
                f"cannot stage '{tensor}' at loop '{name}': its box {extents} takes {size} bytes of shared "
                f"memory, more than {SHARED_BYTES}",
                span,
            )
        buf = replace(staged, shape=tuple(L.const(x) for x in extents))
        body = map_buffer(L.seq(*rest), tensor, buf, offsets)
        copy = copy_box(param, buf, box, extents, _thread_loop(rest))
        return L.seq(L.Alloc(buf), replace(loop, body=L.seq(*lead, copy, body)))

    return replace(func, body=rewrite_loops(func.body, stage))
