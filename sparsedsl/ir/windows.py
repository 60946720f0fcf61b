"""Windowed reads: an N:M row's activations picked in registers instead of gathered.

One token through an N:M weight sums a row's stored values in vector lanes (``sched.vector_sums``):
lane ``v`` of group ``G`` holds stored value ``G * L + v`` and reads ``X_t[((G * L + v) // n) * m + c]``,
``c`` its coordinate in ``[0, m)``. The lanes' reads differ, so a vector loop gathers them: on
x86 without a fast gather, one scalar load and insert a lane. But they all fall in one small
window: ``X_t[G * (L / n) * m + (v // n) * m + c]``, offsets in ``[0, (L / n) * m)``. Read that
window whole as contiguous vectors, then each lane picks its element with a variable permute
(``vpermps``): a few instructions a vector instead of a gather.

``windowed`` rewrites such reads into a ``window`` call (``window_call``): its first argument is
the plain read, which is its meaning wherever it is not vectorised (and what a backend without a
permute of the loop's width emits); the rest say where the window starts, each lane's offset in
it and its width. The backends build the permutes (``window_parts`` takes the call apart).
"""

from __future__ import annotations

from dataclasses import replace

from sparsedsl.ir import loop_ir as L
from sparsedsl.ir.schedule import rewrite_loads, rewrite_loops, rewrite_stores

WINDOW = "window"
# (element type, lanes) -> (LLVM's variable permute within one vector, the CPU features that provide it)
PERMUTES = {
    ("float32", 8): ("llvm.x86.avx2.permps", ("avx2",)),
    ("float32", 16): ("llvm.x86.avx512.permvar.sf.512", ("avx512f",)),
}


def permute_lanes(vector_bits: int) -> tuple[int, ...]:
    """The lane counts of the float32 permutes of a CPU whose vectors are ``vector_bits`` wide
    (AVX2 at 256, AVX-512 at 512; none below: no variable permute of floats)."""
    return tuple(lanes for lanes in (8, 16) if vector_bits >= 256 and lanes * 32 <= vector_bits)


def window_call(plain: L.Load, dim: int, base: L.Expr, offset: L.Expr, width: int) -> L.Call:
    """``plain`` (``buf[..., base + offset, ...]`` at index ``dim``), marked as a read from the window
    ``buf[..., base : base + width, ...]`` (contiguous: the dimensions after ``dim`` have extent 1),
    ``base`` the same in every lane of the vector loop around it, ``offset`` in ``[0, width)``."""
    start = L.Load(plain.buffer, (*plain.indices[:dim], base, *plain.indices[dim + 1 :]))
    return L.Call(WINDOW, (plain, start, offset, L.const(width), L.const(dim)), plain.buffer.dtype)


def window_parts(call: L.Call) -> tuple[L.Load, L.Load, L.Expr, int, int]:
    """(the plain read, the read of the window's first element, the offset, the width, the dim)."""
    plain, start, offset, width, dim = call.args
    return plain, start, offset, width.value, dim.value


def windowed(func: L.LoopFunc, lanes: tuple[int, ...]) -> L.LoopFunc:
    """``func`` with the reads of its vector loops of ``lanes`` lanes (``permute_lanes``) at
    ``((G * L + v) // n) * m + c`` made window reads, where ``v`` is the loop's lane, ``L`` a multiple
    of ``n`` and ``c`` a coordinate the lowering bounds by ``m`` (``func.meta["coordinate_bounds"]``),
    from a local buffer whose later dimensions have extent 1; that buffer is allocated a window
    longer, so that the last group's window stays inside it (its unused end is never picked)."""
    bounds = func.meta.get("coordinate_bounds") or {}
    padded: dict[str, int] = {}

    def in_loop(loop: L.For) -> L.Stmt | None:
        extents = [L.const(n) for n in lanes]
        if loop.kind is not L.LoopKind.VECTORIZED or loop.extent not in extents or loop.start != L.const(0):
            return None
        local = {b.name for b in L.allocs(func.body)}
        lane = (loop.var.name, loop.extent.value)
        def windows_in(store: L.Store) -> L.Store:
            return replace(store, value=rewrite_loads(store.value, lambda ld: _window(ld, lane, bounds, local, padded)))

        body = rewrite_stores(loop.body, windows_in)
        return None if body == loop.body else replace(loop, body=body)

    body = rewrite_loops(func.body, in_loop)
    if not padded:
        return func
    return replace(func, body=_padded(body, padded))


def _window(
    load: L.Load, lane: tuple[str, int], bounds: dict[str, int], local: set[str], padded: dict[str, int]
) -> L.Expr:
    """``load`` as a window read, if it is one (``windowed``; ``lane``: the vector loop's variable,
    from 0, and its extent, which the groups must have too: every lane's offset is then below
    the width); noting the padding it needs."""
    buf = load.buffer
    if buf.name not in local or (buf.dtype, lane[1]) not in PERMUTES:  # no permute of these lanes
        return load
    for dim, index in enumerate(load.indices):
        if not all(d == L.const(1) for d in buf.shape[dim + 1 :]):
            continue
        match index:
            case L.Bin("+", L.Bin("*", L.Bin("//", flat, L.Const(n)), L.Const(m)), L.Var(c)):
                pass
            case L.Bin("+", L.Bin("*", flat, L.Const(m)), L.Var(c)):  # one a group: ``// 1`` folded
                n = 1
            case _:
                continue
        if bounds.get(c, m + 1) > m:
            continue
        match flat:
            case L.Bin("+", L.Bin("*", group, L.Const(per)), L.Var(v)) if (v, per) == lane and per % n == 0:
                width = per // n * m
                base = L.mul(group, L.const(width))
                offset = L.add(L.mul(L.floordiv(L.Var(v), L.const(n)), L.const(m)), L.Var(c))
                padded[buf.name] = max(padded.get(buf.name, 0), width)
                return window_call(load, dim, base, offset, width)
    return load


def _padded(s: L.Stmt, padded: dict[str, int]) -> L.Stmt:
    """``s`` with the buffers of ``padded`` allocated that many elements longer in their first
    dimension (the reads keep their shape: a buffer's later dimensions have extent 1)."""
    match s:
        case L.Alloc(buf) if buf.name in padded:
            return L.Alloc(replace(buf, shape=(L.add(buf.shape[0], L.const(padded[buf.name])), *buf.shape[1:])))
        case L.Seq(stmts):
            return L.Seq(tuple(_padded(st, padded) for st in stmts))
        case L.For():
            return replace(s, body=_padded(s.body, padded))
        case L.If(cond, then):
            return L.If(cond, _padded(then, padded))
    return s
