"""Schedule primitives: checked rewrites of loop IR, each a pure function ``LoopFunc -> LoopFunc``.

Loops are named by their variable (``m_o``, ``n``, ``k``...; ``sparsedsl emit --stage ir`` shows
them). Every primitive validates first and raises ScheduleError at the directive's span.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Protocol

from sparsedsl.errors import ScheduleError, Span
from sparsedsl.ir import loop_ir as L


def loops(s: L.Stmt) -> list[L.For]:
    """Every loop in a statement, outermost first."""
    match s:
        case L.For(body=body):
            return [s, *loops(body)]
        case L.Seq(stmts):
            return [x for st in stmts for x in loops(st)]
        case L.If(_, then):
            return loops(then)
    return []


def _find(func: L.LoopFunc, name: str, span: Span | None) -> list[L.For]:
    found = [f for f in loops(func.body) if f.var.name == name]
    if not found:
        names = sorted({f.var.name for f in loops(func.body)})
        raise ScheduleError(f"kernel '{func.name}' has no loop '{name}' (its loops: {', '.join(names)})", span)
    return found


def rewrite_loops(s: L.Stmt, fn: Callable[[L.For], L.Stmt | None]) -> L.Stmt:
    """Apply ``fn`` to every loop, innermost first; ``None`` keeps the loop."""
    match s:
        case L.For(body=body):
            new = replace(s, body=rewrite_loops(body, fn))
            out = fn(new)
            return new if out is None else out
        case L.Seq(stmts):
            return L.Seq(tuple(rewrite_loops(st, fn) for st in stmts))
        case L.If(cond, then):
            return L.If(cond, rewrite_loops(then, fn))
    return s


def rewrite_stores(s: L.Stmt, fn: Callable[[L.Store], L.Stmt]) -> L.Stmt:
    """Replace every store by ``fn(store)``."""
    match s:
        case L.For(body=body):
            return replace(s, body=rewrite_stores(body, fn))
        case L.Seq(stmts):
            return L.Seq(tuple(rewrite_stores(st, fn) for st in stmts))
        case L.If(cond, then):
            return L.If(cond, rewrite_stores(then, fn))
        case L.Store():
            return fn(s)
    return s


def _stores(s: L.Stmt, lets: dict) -> list[tuple[L.Store, dict[str, tuple[L.Expr, bool]]]]:
    """Every store with what its variables derive from: lets, and the start of inner loops (a
    position loop of a level starts where its parent's positions start, and the position ranges
    of different parents never overlap, so a position derives from its parent)."""
    match s:
        case L.Store():
            return [(s, dict(lets))]
        case L.Let(var, value):
            lets[var.name] = (value, False)
            return []
        case L.For(var, start, _, body, _):
            return _stores(body, {**lets, var.name: (start, True)})
        case L.If(then=body):
            return _stores(body, dict(lets))
        case L.Seq(stmts):
            inner = dict(lets)
            return [x for st in stmts for x in _stores(st, inner)]
    return []


def _distinct(e: L.Expr, name: str, lets: dict[str, tuple[L.Expr, bool]]) -> bool:
    """Whether different values of ``name`` give different values of index ``e``: ``e`` uses it
    arithmetically (not through a load: ``crd[q]`` may repeat across rows), directly or through a
    let, or through a loop whose range starts from it (position ranges of different parents are
    disjoint, by the level contract)."""
    match e:
        case L.Var(n) if n == name:
            return True
        case L.Var(n) if n in lets:
            value, is_loop = lets[n]
            return L.uses(value, name) if is_loop else _distinct(value, name, lets)
        case L.Bin(op, a, b) if op in ("+", "-", "*"):
            return _distinct(a, name, lets) or _distinct(b, name, lets)
        case L.Cast(_, v):
            return _distinct(v, name, lets)
    return False


def _check_independent(loop: L.For, what: str, span: Span | None) -> None:
    """Every store to a buffer not private to one iteration must be indexed by the loop variable."""
    private = {b.name for b in L.allocs(loop.body)}
    for store, lets in _stores(loop.body, {}):
        if store.buffer.name in private:
            continue
        if not any(_distinct(i, loop.var.name, lets) for i in store.indices):
            raise ScheduleError(
                f"cannot {what} loop '{loop.var.name}': iterations all write '{store.buffer.name}' at the same "
                f"place (a reduction carried by the loop would race)",
                span,
            )


MAX_THREADS = 1024
MAX_REDUCED = 64  # accumulator values combined across threads, one after another


def _check_thread_loop(func: L.LoopFunc, loop: L.For, span: Span | None) -> None:
    """A loop bound to ``threadIdx.x``: a constant number of threads, not inside (or around)
    another thread loop, and iterations that are independent or only add into accumulators
    declared outside the loop (a cross-thread reduction: each thread sums its share, then the
    threads combine their partial sums)."""
    name, what = loop.var.name, f"cannot bind loop '{loop.var.name}' to threadIdx.x"
    if not (isinstance(loop.extent, L.Const) and 1 <= loop.extent.value <= MAX_THREADS):
        raise ScheduleError(f"{what}: its extent must be a constant of at most {MAX_THREADS} (split it first)", span)
    for other in loops(func.body):
        nested = other is not loop and (loop in loops(other.body) or other in loops(loop.body))
        if nested and other.kind is L.LoopKind.THREAD_X:
            raise ScheduleError(f"{what}: loop '{other.var.name}' around or inside it is bound to threadIdx.x", span)
    private = {b.name for b in L.allocs(loop.body)}
    summed = set(cross_thread_sums(loop.body))
    sums: dict[str, int] = {}
    for store, lets in _stores(loop.body, {}):
        buf = store.buffer.name
        if buf in private or (buf not in summed and any(_distinct(i, name, lets) for i in store.indices)):
            continue
        if buf not in summed or not _is_sum(store, name):
            raise ScheduleError(
                f"{what}: its iterations all write '{buf}' at the same place, or write a register buffer "
                f"declared outside the loop (every thread has its own), and not as a sum "
                f"'{buf}[...] = {buf}[...] + ...' into such an accumulator",
                span,
            )
        sums[buf] = sums.get(buf, 0) + 1
        if _values(store.buffer) > MAX_REDUCED:
            raise ScheduleError(f"{what}: its accumulator '{buf}' must hold at most {MAX_REDUCED} values", span)
    for buf, count in sums.items():
        if not _only_added_to(loop.body, buf, count):
            raise ScheduleError(f"{what}: the accumulator '{buf}' is read inside it, not only added to", span)


def _values(buf: L.Buffer) -> int:
    """How many values a buffer holds; a dimension of unknown size counts as more than any
    accumulator may hold (``MAX_REDUCED``)."""
    return math.prod(d.value if isinstance(d, L.Const) else MAX_REDUCED + 1 for d in buf.shape)


def _only_added_to(body: L.Stmt, buffer: str, sums: int) -> bool:
    """Whether ``body`` reads ``buffer`` only in its ``sums`` sums ``buffer[i] = buffer[i] + e``."""
    return sum(e.buffer.name == buffer for e in L.loads(body)) == sums


def cross_thread_sums(body: L.Stmt) -> list[str]:
    """The register (``local``) buffers declared outside a thread loop that its ``body`` writes:
    each thread has its own copy, so ``_check_thread_loop`` admits only sums into them, which the
    code generator combines across the threads."""
    inside = {b.name for b in L.allocs(body)}
    return sorted({s.buffer.name for s in L.stores(body) if s.buffer.scope == "local"} - inside)


def _is_sum(store: L.Store, thread: str) -> bool:
    """``acc[i] = acc[i] + e``: the same element, not chosen by the thread, ``e`` not reading ``acc``."""
    match store.value:
        case L.Bin("+", L.Load(buf, idx), e):
            reads_acc = any(isinstance(x, L.Load) and x.buffer.name == buf.name for x in L.subexprs(e))
            return (
                buf.name == store.buffer.name
                and idx == store.indices
                and not any(L.uses(i, thread) for i in idx)
                and not reads_acc
            )
    return False


def set_kind(func: L.LoopFunc, name: str, kind: L.LoopKind, span: Span | None = None) -> L.LoopFunc:
    """Mark loop ``name`` parallel, vectorized or unrolled, after checking that it may be."""
    targets = _find(func, name, span)
    for loop in targets:
        if kind in (L.LoopKind.VECTORIZED, L.LoopKind.UNROLLED) and not isinstance(loop.extent, L.Const):
            verb = "unroll" if kind is L.LoopKind.UNROLLED else "vectorize"
            raise ScheduleError(f"cannot {verb} loop '{name}': its extent is not a constant (split it first)", span)
        if kind is L.LoopKind.VECTORIZED and any(True for _ in loops(loop.body)):
            raise ScheduleError(f"cannot vectorize loop '{name}': it is not innermost", span)
        if kind is L.LoopKind.VECTORIZED:
            _check_independent(loop, "vectorize", span)
        elif kind is L.LoopKind.THREAD_X:
            _check_thread_loop(func, loop, span)
        elif kind is not L.LoopKind.UNROLLED and kind is not L.LoopKind.SERIAL:
            _check_independent(loop, "parallelize" if kind is L.LoopKind.PARALLEL else f"bind to {kind.value}", span)
        if kind is L.LoopKind.PARALLEL:
            nested = [
                f
                for f in loops(func.body)
                if f.kind is L.LoopKind.PARALLEL and f is not loop and (loop in loops(f.body) or f in loops(loop.body))
            ]
            if nested:
                other = nested[0].var.name
                raise ScheduleError(
                    f"cannot parallelize loop '{name}': loop '{other}' around or inside it is already parallel", span
                )
    ids = {id(t) for t in targets}
    return _check_sizes(replace(func, body=_map_loops(func.body, ids, lambda f: replace(f, kind=kind))), span)


MAX_LANES = 4096  # a vectorized loop's extent, and a token tile's (check.MAX_TILE): wider ones crash LLVM
MAX_UNROLLED = 1024  # copies of one statement that nested unrolled loops may make
MAX_JAMMED = 8  # rows of a loop whose accumulators ``jammed_rows`` keeps at once


def _copies(s: L.Stmt) -> tuple[int, str | None]:
    """The most copies unrolling makes of one statement of ``s``, and the outermost unrolled loop
    that makes them."""
    match s:
        case L.For(var, _, L.Const(extent), body, L.LoopKind.UNROLLED):
            inner, _ = _copies(body)
            return int(extent) * inner, var.name
        case L.For(body=body) | L.If(then=body):
            return _copies(body)
        case L.Seq(stmts) if stmts:
            return max((_copies(st) for st in stmts), key=lambda c: c[0])
    return 1, None


def _check_sizes(func: L.LoopFunc, span: Span | None) -> L.LoopFunc:
    """Vector loops of at most ``MAX_LANES`` lanes, unrolling into at most ``MAX_UNROLLED`` copies."""
    for f in loops(func.body):
        if f.kind is L.LoopKind.VECTORIZED and isinstance(f.extent, L.Const) and f.extent.value > MAX_LANES:
            raise ScheduleError(
                f"cannot vectorize loop '{f.var.name}': {f.extent.value} lanes, at most {MAX_LANES} (split it)", span
            )
    copies, outer = _copies(func.body)
    if copies > MAX_UNROLLED:
        raise ScheduleError(
            f"cannot unroll loop '{outer}' and the unrolled loops in it: {copies} copies of their body, "
            f"at most {MAX_UNROLLED}",
            span,
        )
    return func


def _map_loops(s: L.Stmt, ids: set[int], fn) -> L.Stmt:
    match s:
        case L.For(body=body):
            new = replace(s, body=_map_loops(body, ids, fn))
            return fn(new) if id(s) in ids else new
        case L.Seq(stmts):
            return L.Seq(tuple(_map_loops(st, ids, fn) for st in stmts))
        case L.If(cond, then):
            return L.If(cond, _map_loops(then, ids, fn))
    return s


def unflattened(e: L.Expr) -> L.Expr:
    """``e`` with a position rebuilt from a flat index folded back into it: ``(a + x // c) * c + x % c``
    (either order inside) is ``a * c + x``, and ``(x // c) * c + x % c`` is ``x``. Flattening a
    nest (``vector_sums``) or splitting a fused loop substitutes ``x // c`` and ``x % c`` for two
    loop variables; unfolded, a position that is contiguous in ``x`` would not look so to the
    vectorisers (a gather of the stored values)."""
    match e:
        case L.Bin("+", L.Bin("*", outer, L.Const(c)), L.Bin("%", x, L.Const(c2))) if c == c2:
            quotient = L.Bin("//", x, L.Const(c))
            if outer == quotient:
                return x
            if isinstance(outer, L.Bin) and outer.op == "+" and quotient in (outer.a, outer.b):
                other = outer.b if outer.a == quotient else outer.a
                return L.add(L.mul(other, L.const(c, dtype=L.dtype_of(x))), x)
    return e


def substitute(s, name: str, value: L.Expr):
    """Replace variable ``name`` by ``value`` in a statement or expression."""
    match s:
        case L.Var(n) if n == name:
            return value
        case L.Bin(op, a, b):
            return unflattened(L.Bin(op, substitute(a, name, value), substitute(b, name, value)))
        case L.Load(buf, idx):
            return L.Load(buf, tuple(substitute(i, name, value) for i in idx))
        case L.Call(f, args, dt):
            return L.Call(f, tuple(substitute(a, name, value) for a in args), dt)
        case L.Cast(dt, v):
            return L.Cast(dt, substitute(v, name, value))
        case L.Select(c, t, o):
            return L.Select(substitute(c, name, value), substitute(t, name, value), substitute(o, name, value))
        case L.For(var, start, extent, body, kind):
            return L.For(
                var,
                substitute(start, name, value),
                substitute(extent, name, value),
                substitute(body, name, value),
                kind,
            )
        case L.Seq(stmts):
            return L.Seq(tuple(substitute(st, name, value) for st in stmts))
        case L.Store(_, idx, v):
            return replace(s, indices=tuple(substitute(i, name, value) for i in idx), value=substitute(v, name, value))
        case L.Let(var, v):
            return L.Let(var, substitute(v, name, value))
        case L.If(c, t):
            return L.If(substitute(c, name, value), substitute(t, name, value))
    return s


def rewrite_loads(e: L.Expr, fn: Callable[[L.Load], L.Expr]) -> L.Expr:
    """``e`` with every read replaced by ``fn`` of it (its indices rewritten first)."""
    match e:
        case L.Load(buf, idx):
            return fn(L.Load(buf, tuple(rewrite_loads(i, fn) for i in idx)))
        case L.Bin(op, a, b):
            return L.Bin(op, rewrite_loads(a, fn), rewrite_loads(b, fn))
        case L.Call(f, args, dt):
            return L.Call(f, tuple(rewrite_loads(a, fn) for a in args), dt)
        case L.Cast(dt, v):
            return L.Cast(dt, rewrite_loads(v, fn))
        case L.Select(c, t, o):
            return L.Select(rewrite_loads(c, fn), rewrite_loads(t, fn), rewrite_loads(o, fn))
    return e


def map_buffer(s: L.Stmt, old: str, new: L.Buffer, index: Callable[[tuple], tuple]) -> L.Stmt:
    """Rewrite every access to buffer ``old`` as an access to ``new`` at ``index(indices)``; the
    declaration of ``old`` stays only when ``new`` is a local buffer (a parameter, or a buffer
    declared elsewhere, needs none)."""

    def expr(e):
        return rewrite_loads(e, lambda ld: L.Load(new, tuple(index(ld.indices))) if ld.buffer.name == old else ld)

    match s:
        case L.For(var, start, extent, body, kind):
            return L.For(var, expr(start), expr(extent), map_buffer(body, old, new, index), kind)
        case L.Seq(stmts):
            return L.seq(*(map_buffer(st, old, new, index) for st in stmts))
        case L.If(cond, then):
            return L.If(expr(cond), map_buffer(then, old, new, index))
        case L.Store(buf, idx, value):
            target, where = (
                (new, index(tuple(expr(i) for i in idx))) if buf.name == old else (buf, tuple(expr(i) for i in idx))
            )
            return replace(s, buffer=target, indices=tuple(where), value=expr(value))
        case L.Let(var, value):
            return L.Let(var, expr(value))
        case L.Alloc(buf) if buf.name == old:
            return L.Alloc(new) if new.scope == "local" else L.seq()
    return s


def used_names(func: L.LoopFunc) -> set[str]:
    """Every name the function gives a variable or buffer: parameters, sizes, loops, lets, locals."""
    exprs = [e for x in L.stmt_exprs(func.body) for e in L.subexprs(x)]
    exprs += [d for p in func.params if isinstance(p, L.Buffer) for d in p.shape]
    taken = {e.name for e in exprs if isinstance(e, L.Var | L.SizeVar)}
    taken |= {p.name for p in func.params} | {b.name for b in L.allocs(func.body)}
    taken |= {f.var.name for f in loops(func.body)}
    return taken | {x.var.name for x in L.leaves(func.body) if isinstance(x, L.Let)}


# The kinds the two loops of a split keep: a parallel loop shares out its outer loop, a vectorized
# one keeps its lanes innermost, an unrolled one unrolls both (their extents are constants).
_SPLIT_KINDS = {
    L.LoopKind.PARALLEL: (L.LoopKind.PARALLEL, L.LoopKind.SERIAL),
    L.LoopKind.VECTORIZED: (L.LoopKind.SERIAL, L.LoopKind.VECTORIZED),
    L.LoopKind.UNROLLED: (L.LoopKind.UNROLLED, L.LoopKind.UNROLLED),
}


def split(func: L.LoopFunc, name: str, factor: int, outer: str, inner: str, span: Span | None = None) -> L.LoopFunc:
    """``for x in [a, a+E)`` -> ``for outer in [0, ceil(E/f)): for inner in [0, f)``, guarded if
    needed; every loop named ``x`` is split. The outer loop stays parallel, the inner one
    vectorized (``_SPLIT_KINDS``)."""
    _find(func, name, span)
    taken = used_names(func)
    for new in (outer, inner):
        if new in taken:
            raise ScheduleError(f"cannot split into '{new}': the kernel already uses that name", span)
    if outer == inner:
        raise ScheduleError(f"cannot split into '{outer}' twice: the two loops need two names", span)

    def rewrite(loop: L.For) -> L.Stmt | None:
        if loop.var.name != name:
            return None
        o, i = L.Var(outer), L.Var(inner)
        index = L.add(loop.start, L.add(L.mul(o, L.const(factor)), i))
        body = substitute(loop.body, name, index)
        exact = isinstance(loop.extent, L.Const) and loop.extent.value % factor == 0
        if not exact:
            body = L.If(L.Bin("<", L.add(L.mul(o, L.const(factor)), i), loop.extent), body)
        count = (
            L.const(loop.extent.value // factor)
            if exact
            else L.floordiv(L.add(loop.extent, L.const(factor - 1)), L.const(factor))
        )
        kinds = _SPLIT_KINDS.get(loop.kind, (loop.kind, L.LoopKind.SERIAL))
        return L.For(o, L.const(0), count, L.For(i, L.const(0), L.const(factor), body, kinds[1]), kinds[0])

    return _check_sizes(replace(func, body=rewrite_loops(func.body, rewrite)), span)


def _without_unit_loops(s: L.Stmt) -> L.Stmt:
    """Loops of one iteration replaced by their body (the variable bound to the start)."""
    return rewrite_loops(s, lambda f: substitute(f.body, f.var.name, f.start) if f.extent == L.const(1) else None)


def groups_of(name: str) -> str:
    """The loop over groups of iterations of loop ``name`` that ``vector_sums`` (lanes) and
    ``interleaved_sums`` (copies) make."""
    return f"{name}_g"


def vector_sums(func: L.LoopFunc, name: str, lanes: int) -> L.LoopFunc:
    """Sum reduction loop ``name`` in vector lanes: its iterations (with the constant-extent loops
    nested in it, flattened) in groups of ``lanes``, one a lane, each lane adding into its own
    partial sum; the iterations left over and then the lanes' partial sums are added into the
    accumulator. For a sum whose every add would otherwise wait on the one before (one token's
    dot product: a scalar dependency chain, a gathered operand). Left alone unless the loop, once
    flattened, holds no other loop and only sums ``acc[i] = acc[i] + e`` into one small
    constant-shaped accumulator read nowhere else in it."""
    loop = next((f for f in loops(func.body) if f.var.name == name), None)
    if loop is None:
        return func
    nest, body = [loop], _without_unit_loops(loop.body)
    while isinstance(body, L.For) and isinstance(body.extent, L.Const) and body.start == L.const(0):
        nest.append(body)
        body = body.body
    flat = L.Var(f"{name}_f")
    extent = functools.reduce(L.mul, (f.extent for f in nest))
    for f, index in zip(nest, L.unflatten(flat, [f.extent for f in nest])):
        body = substitute(body, f.var.name, L.add(f.start, index))
    sums = L.stores(body)
    accs = {st.buffer for st in sums}
    if loops(body) or len(accs) != 1 or not all(_is_sum(st, flat.name) for st in sums):
        return func
    (acc,) = accs
    if lanes * _values(acc) > MAX_REDUCED or not _only_added_to(body, acc.name, len(sums)):
        return func
    part = L.Buffer(f"{acc.name}_v", acc.dtype, (*acc.shape, L.const(lanes)), acc.scope)
    group, lane = L.Var(groups_of(name)), L.Var(f"{name}_v")
    in_lanes = rewrite_stores(
        substitute(body, flat.name, L.add(L.mul(group, L.const(lanes)), lane)),
        lambda st: L.Store(part, (*st.indices, lane), L.add(L.Load(part, (*st.indices, lane)), st.value.b)),
    )
    whole = L.floordiv(extent, L.const(lanes))
    done = L.mul(whole, L.const(lanes))
    elements = [L.Var(f"{name}_e{d}") for d in range(len(acc.shape))]
    each = [(e, d, L.LoopKind.UNROLLED) for e, d in zip(elements, acc.shape)]
    zeroed = L.Store(part, (*elements, lane), L.const(0.0, acc.dtype))
    zero = L.nest(zeroed, [*each, (lane, L.const(lanes), L.LoopKind.VECTORIZED)])
    add = L.Store(acc, tuple(elements), L.add(L.Load(acc, tuple(elements)), L.Load(part, (*elements, lane))))
    total = L.nest(add, [*each, (lane, L.const(lanes), L.LoopKind.SERIAL)])  # the lanes added one by one
    new = L.seq(
        L.Alloc(part),
        zero,
        L.For(group, L.const(0), whole, L.For(lane, L.const(0), L.const(lanes), in_lanes, L.LoopKind.VECTORIZED)),
        L.For(flat, done, L.sub(extent, done), body),
        total,
    )
    return replace(func, body=rewrite_loops(func.body, lambda f: new if f == loop else None))


def interleaved_sums(func: L.LoopFunc, name: str, copies: int) -> L.LoopFunc:
    """Sum reduction loop ``name`` into ``copies`` independent partial sums: its iterations in
    groups of ``copies``, unrolled, iteration ``u`` of a group adding into copy ``u`` of the
    accumulator; the iterations left over, then the copies, are added into the accumulator. For a
    sum whose every add would otherwise wait on the one before: ``vector_sums``' groups of lanes,
    or one token through row blocks (``BSR(4, 1)``), whose rows go into the lanes of a vector.
    Left alone unless the body only sums ``acc[i] = acc[i] + e`` into one small constant-shaped
    accumulator read nowhere else in it, in vector lanes or one element a row of the block (a
    block of several k, ``BSR(1, 4)``, keeps the shape ``ir/dot_products.py`` matches)."""
    loop = next((f for f in loops(func.body) if f.var.name == name), None)
    if loop is None:
        return func
    sums = L.stores(loop.body)
    accs = {st.buffer for st in sums}
    if len(accs) != 1 or not all(_is_sum(st, name) for st in sums):
        return func
    (acc,) = accs
    wide = any(f.kind is L.LoopKind.VECTORIZED and f.extent != L.const(1) for f in loops(loop.body))
    lanes = loop.body if wide else _lanes_of_block(loop.body)
    if lanes is None or copies * _values(acc) > MAX_REDUCED or not _only_added_to(loop.body, acc.name, len(sums)):
        return func
    part = L.Buffer(f"{acc.name}_u", acc.dtype, (L.const(copies), *acc.shape), acc.scope)
    group, copy = L.Var(groups_of(name)), L.Var(f"{name}_u")
    whole, at, left = _in_groups(loop, copies, group, copy)
    in_copies = rewrite_stores(
        substitute(lanes, name, at),
        lambda st: L.Store(part, (copy, *st.indices), L.add(L.Load(part, (copy, *st.indices)), st.value.b)),
    )
    elements = [L.Var(f"{name}_e{d}") for d in range(len(acc.shape))]
    each = [(e, d, L.LoopKind.UNROLLED) for e, d in [(copy, L.const(copies)), *zip(elements, acc.shape)]]
    if wide:  # the copies' lanes zeroed and added a vector at a time (acc's last index is lanes)
        each[-1] = (*each[-1][:2], L.LoopKind.VECTORIZED)
    zero = L.nest(L.Store(part, (copy, *elements), L.const(0.0, acc.dtype)), each)
    add = L.Store(acc, tuple(elements), L.add(L.Load(acc, tuple(elements)), L.Load(part, (copy, *elements))))
    total = L.nest(add, each)
    new = L.seq(
        L.Alloc(part),
        zero,
        L.For(group, L.const(0), whole, L.For(copy, L.const(0), L.const(copies), in_copies, L.LoopKind.UNROLLED)),
        left,
        total,
    )
    return replace(func, body=rewrite_loops(func.body, lambda f: new if f == loop else None))


def jammed_rows(func: L.LoopFunc, acc: str, lanes: int) -> L.LoopFunc:
    """Unroll and jam each loop whose iterations each sum into their own small accumulator ``acc``
    (allocated first thing in its body: a row of a dense product, attention's scores of one key):
    as many iterations as their accumulators fit ``lanes`` f32 lanes (at most ``MAX_JAMMED``)
    share one pass over the loops inside, iteration ``r`` of a group summing into row ``r`` of
    ``acc[rows, ...]``, every vector loop (and lone statement) inside repeated for the group's
    rows, unrolled. An operand the rows share (the staged token tile) is then loaded once for all
    of them, and the adds of different rows are independent, where one row's adds wait on each
    other. The iterations left over run as before; the group loop keeps the loop's kind. Left
    alone unless the iterations are independent: the loops inside have bounds that do not depend
    on the row (a CSR row's stored values do), every store outside ``acc`` is indexed by the row,
    and nothing the loop stores there is read in it (a read could then move before the write of
    an earlier row)."""
    taken = used_names(func)

    def jam(loop: L.For) -> L.Stmt | None:
        stmts = list(loop.body.stmts) if isinstance(loop.body, L.Seq) else [loop.body]
        lets = []
        while stmts and isinstance(stmts[0], L.Let):
            lets.append(stmts.pop(0))
        if not stmts or not isinstance(stmts[0], L.Alloc) or stmts[0].buffer.name != acc:
            return None
        buf = stmts[0].buffer
        if not all(isinstance(d, L.Const) for d in buf.shape):
            return None
        rows = min(MAX_JAMMED, lanes // _values(buf))
        name = loop.var.name
        group, row = L.Var(f"{name}_j"), L.Var(f"{name}_r")
        if rows < 2 or group.name in taken or row.name in taken:
            return None
        try:
            _check_independent(loop, "jam", None)
        except ScheduleError:
            return None
        private = {b.name for b in L.allocs(loop.body)}
        written = {st.buffer.name for st in L.stores(loop.body)} - private
        if any(ld.buffer.name in written for ld in L.loads(loop.body)):
            return None
        rest = L.seq(*stmts[1:])
        for let in reversed(lets):
            rest = substitute(rest, let.var.name, let.value)
        jammed = L.Buffer(buf.name, buf.dtype, (L.const(rows), *buf.shape), buf.scope)
        whole, at, left = _in_groups(loop, rows, group, row)

        def each_row(s: L.Stmt) -> L.Stmt:
            mine = map_buffer(substitute(s, name, at), acc, jammed, lambda idx: (row, *idx))
            return L.For(row, L.const(0), L.const(rows), mine, L.LoopKind.UNROLLED)

        def spread(s: L.Stmt) -> L.Stmt | None:
            match s:
                case L.Seq(inner):
                    parts = [spread(x) for x in inner]
                    return None if any(p is None for p in parts) else L.seq(*parts)
                case L.For(_, start, extent, body, kind) if kind is not L.LoopKind.VECTORIZED:
                    if L.uses(start, name) or L.uses(extent, name):
                        return None
                    inner = spread(body)
                    return None if inner is None else replace(s, body=inner)
                case L.For() | L.Store() | L.If():
                    return each_row(s)
            return None  # a let or a local buffer of its own: not repeated per row here

        body = spread(rest)
        if body is None:
            return None
        return L.seq(L.For(group, L.const(0), whole, L.seq(L.Alloc(jammed), body), loop.kind), left)

    return replace(func, body=rewrite_loops(func.body, jam))


def _in_groups(loop: L.For, size: int, group: L.Var, member: L.Var) -> tuple[L.Expr, L.Expr, L.Stmt | None]:
    """``loop`` taken ``size`` iterations at a time (``interleaved_sums``' copies, ``jammed_rows``'
    rows): the number of whole groups, the iteration that ``member`` of group ``group`` is, and
    the loop over the iterations left over (None where none can be)."""
    whole = L.floordiv(loop.extent, L.const(size))
    done = L.mul(whole, L.const(size))
    left = replace(loop, start=L.add(loop.start, done), extent=L.sub(loop.extent, done))
    at = L.add(loop.start, L.add(L.mul(group, L.const(size)), member))
    return whole, at, None if left.extent == L.const(0) else left


def _lanes_of_block(body: L.Stmt) -> L.Stmt | None:
    """``body`` without its loops of one iteration, each unrolled loop around a lone store to an
    element it chooses (a stored block's rows, one add each) vectorized: its adds in the lanes of
    one vector; None when it has no such loop."""

    def lanes(f: L.For) -> L.For | None:
        store = f.body
        if f.kind is not L.LoopKind.UNROLLED or not isinstance(store, L.Store) or not isinstance(f.extent, L.Const):
            return None
        chooses = any(L.uses(i, f.var.name) for i in store.indices)
        return replace(f, kind=L.LoopKind.VECTORIZED) if chooses else None

    vectorized = rewrite_loops(_without_unit_loops(body), lanes)
    return vectorized if any(f.kind is L.LoopKind.VECTORIZED for f in loops(vectorized)) else None


SORTED_PARTS = 32  # parts of a sum over sorted rows (COO) shared among threads: balanced up to 32 threads
SEARCH_STEPS = 32  # halvings of a binary search over int32 positions: at most 2^31 of them


def _lower_bound(
    bounds: L.Buffer, start: L.Expr, at: L.Expr, key_of: Callable[[L.Expr], L.Expr], step: L.Var
) -> list[L.Stmt]:
    """Statements leaving in ``bounds[0]`` the first position in ``[start, at]`` whose key is
    ``key_of(at)``'s or more (keys never decrease along the positions): a binary search of
    ``SEARCH_STEPS`` halvings, each a no-op once the range is empty."""
    lo, hi = L.load(bounds, L.const(0)), L.load(bounds, L.const(1))
    mid, key = L.Var(f"{step.name}_mid"), L.Var(f"{step.name}_key")
    halve = L.seq(
        L.Let(mid, L.floordiv(L.add(lo, hi), L.const(2))),
        L.If(L.Bin("<", key_of(mid), key), L.Store(bounds, (L.const(0),), L.add(mid, L.const(1)))),
        L.If(L.Bin("<=", key, key_of(mid)), L.Store(bounds, (L.const(1),), mid)),
    )
    return [
        L.Let(key, key_of(at)),
        L.Store(bounds, (L.const(0),), start),
        L.Store(bounds, (L.const(1),), at),
        L.For(step, L.const(0), L.const(SEARCH_STEPS), L.If(L.Bin("<", lo, hi), halve)),
    ]


def share_sorted(func: L.LoopFunc, name: str, row: str, parts: int, span: Span | None = None) -> L.LoopFunc:
    """Share loop ``name`` over the positions of a level whose coordinates never decrease along
    them (the root of COO; the lowering names it in ``meta["sorted_rows"]``) among ``parts``
    parallel parts of about equal length, each starting at a row boundary: part ``p`` starts at
    the first position holding the coordinate found ``p / parts`` of the way along (a binary
    search), so every row's positions fall in one part. Race-free when every store to memory not
    private to an iteration is indexed by the coordinate, the let ``row`` (checked): a part writes
    only its own rows."""
    loop = next((f for f in loops(func.body) if f.var.name == name), None)
    first = loop.body.stmts[0] if loop is not None and isinstance(loop.body, L.Seq) else None
    if not (isinstance(first, L.Let) and first.var.name == row and L.uses(first.value, name)):
        raise ScheduleError(f"cannot share loop '{name}' by rows: it does not open with the row 'let {row}'", span)
    around = [f for f in loops(func.body) if f.kind is L.LoopKind.PARALLEL and (loop in loops(f.body) or f is loop)]
    if around or any(f.kind is L.LoopKind.PARALLEL for f in loops(loop.body)):
        other = (around or [f for f in loops(loop.body) if f.kind is L.LoopKind.PARALLEL])[0].var.name
        raise ScheduleError(
            f"cannot share loop '{name}' by rows: loop '{other}' around or inside it is already parallel", span
        )
    private = {b.name for b in L.allocs(loop.body)}
    for store, _ in _stores(loop.body, {}):
        if store.buffer.name not in private and first.var not in store.indices:
            raise ScheduleError(
                f"cannot share loop '{name}' by rows: it writes '{store.buffer.name}' at places not indexed by "
                f"the row '{row}' (parts would race)",
                span,
            )
    part, a, e = L.Var(f"{name}_p"), loop.start, loop.extent
    bounds = L.Buffer(f"{name}_s", "int64", (L.const(2),))
    last = L.sub(L.add(a, e), L.const(1))

    def key_of(q: L.Expr) -> L.Expr:
        return substitute(first.value, name, q)

    def at(p: L.Expr) -> L.Expr:
        return L.minimum(L.add(a, L.floordiv(L.mul(p, e), L.const(parts))), last)

    start, stop = L.Var(f"{name}_lo"), L.Var(f"{name}_hi")
    body = L.seq(
        L.Alloc(bounds),
        *_lower_bound(bounds, a, at(part), key_of, L.Var(f"{name}_a")),
        L.Let(start, L.load(bounds, L.const(0))),
        *_lower_bound(bounds, a, at(L.add(part, L.const(1))), key_of, L.Var(f"{name}_b")),
        L.If(L.Bin("==", part, L.const(parts - 1)), L.Store(bounds, (L.const(0),), L.add(a, e))),
        L.Let(stop, L.load(bounds, L.const(0))),
        replace(loop, start=start, extent=L.sub(stop, start)),
    )
    shared = L.If(L.Bin("<", L.const(0), e), L.For(part, L.const(0), L.const(parts), body, L.LoopKind.PARALLEL))
    return replace(func, body=rewrite_loops(func.body, lambda f: shared if f == loop else None))


def reorder(func: L.LoopFunc, names: list[str], span: Span | None = None) -> L.LoopFunc:
    """Permute every perfectly nested chain of these loops (a name may cover several loops) into
    the order given, outermost first; at least one such chain must exist."""
    for n in names:
        _find(func, n, span)
    if len(set(names)) != len(names):
        raise ScheduleError(f"cannot reorder: loops {', '.join(names)} name one loop twice", span)
    done = []

    def rewrite(loop: L.For) -> L.Stmt | None:
        chain = [loop]
        while len(chain) < len(names) and isinstance(chain[-1].body, L.For):
            chain.append(chain[-1].body)
        if sorted(f.var.name for f in chain) != sorted(names):
            return None
        by_name = {f.var.name: f for f in chain}
        for pos, n in enumerate(names):
            f = by_name[n]
            for inner_name in names[pos + 1 :]:
                if L.uses(f.start, inner_name) or L.uses(f.extent, inner_name):
                    raise ScheduleError(
                        f"cannot move loop '{inner_name}' inside '{n}': the bounds of '{n}' depend on it", span
                    )
        moved = next((by_name[n] for n in names[:-1] if by_name[n].kind is L.LoopKind.VECTORIZED), None)
        if moved is not None:
            raise ScheduleError(f"cannot reorder: vectorized loop '{moved.var.name}' must stay innermost", span)
        body = chain[-1].body
        for n in reversed(names):
            body = replace(by_name[n], body=body)
        done.append(loop)
        return body

    body = rewrite_loops(func.body, rewrite)
    if not done:
        raise ScheduleError(
            f"cannot reorder: loops {', '.join(names)} are not perfectly nested (no statement between them)", span
        )
    return replace(func, body=body)


class LoopName(Protocol):
    """A loop name as written in a directive."""

    text: str


class Directive(Protocol):
    """What scheduling reads of a directive (the frontend's ``ast.Directive`` is one): the IR
    depends on this shape, not on the parser."""

    verb: str
    loops: Sequence[LoopName]
    factor: int | None
    span: Span | None


def apply(func: L.LoopFunc, directives: Iterable[Directive]) -> L.LoopFunc:
    """Apply the loop directives of a ``schedule`` block in order (``tile``/``layout`` act earlier,
    in lowering; ``bind`` belongs to GPU targets)."""
    kinds = {"parallel": L.LoopKind.PARALLEL, "vectorize": L.LoopKind.VECTORIZED, "unroll": L.LoopKind.UNROLLED}
    for d in directives:
        loop_names = [n.text for n in d.loops]
        if d.verb in kinds:
            func = set_kind(func, loop_names[0], kinds[d.verb], d.span)
        elif d.verb == "split":
            func = split(func, loop_names[0], d.factor, loop_names[1], loop_names[2], d.span)
        elif d.verb == "reorder":
            func = reorder(func, loop_names, d.span)
    return func


def default(func: L.LoopFunc) -> dict[str, L.LoopFunc]:
    """The schedules used when none is written, by name; the runtime picks one per call.

    Constant-extent level loops (block rows, N:M slots) are unrolled and the token tile is
    vectorised (by lowering). Parallelism: ``tiles`` runs token tiles in parallel (one fork per
    call: best when there are at least as many tiles as threads); ``rows`` runs output row blocks,
    the activation staging and the write-out in parallel inside each tile (race-free only when
    gathering; best for few tokens), and a scatter over sorted rows (COO) in ``SORTED_PARTS``
    parts that start at row boundaries (``share_sorted``).
    """
    for loop in loops(func.body):
        if loop.kind is L.LoopKind.SERIAL and isinstance(loop.extent, L.Const) and 1 < loop.extent.value <= 8:
            try:
                func = set_kind(func, loop.var.name, L.LoopKind.UNROLLED)
            except ScheduleError:  # nested in enough unrolled loops already
                continue
    sorted_rows = func.meta.get("sorted_rows")
    candidates = func.meta.get("parallel", ())
    tiles = [c for c in candidates if c == f"{func.meta.get('token')}_o"]
    rows = [c for c in candidates if c not in tiles]
    variants = {}
    for name, loops_ in (("tiles", tiles), ("rows", rows)):
        chosen = func
        for loop_name in loops_:
            try:
                chosen = set_kind(chosen, loop_name, L.LoopKind.PARALLEL)
            except ScheduleError:
                continue
        if name == "rows" and sorted_rows:
            chosen = share_sorted(chosen, *sorted_rows, SORTED_PARTS)
        if chosen is not func:
            variants[name] = replace(chosen, name=f"{func.name}_{name}")
    return variants or {"serial": func}


def pick(variants: dict[str, L.LoopFunc], tokens: int | None, threads: int) -> str:
    """The variant of ``default`` to run for a call with ``tokens`` tokens: the smallest token tile
    that holds them (up to the largest tile), then parallel ``tiles`` if there are enough of them
    for every thread, else ``rows``; never one only a measurement picks (``measured_only``)."""
    variants = {name: f for name, f in variants.items() if not f.meta.get("measured_only")}
    if len(variants) == 1 or tokens is None:
        return next(iter(variants))
    tiles = sorted({f.meta.get("tile", 1) for f in variants.values()})
    tile = next((t for t in tiles if t >= tokens), tiles[-1])
    mine = {name: f for name, f in variants.items() if f.meta.get("tile", 1) == tile}
    enough = -(-tokens // tile) >= threads
    for kind in ("tiles", "rows") if enough else ("rows", "tiles"):
        for name in mine:
            if name.split("_")[0] == kind:  # "rows", "rows_small"...
                return name
    return next(iter(mine))
