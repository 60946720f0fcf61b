"""Transposing copies in vector shuffles, for the CPU backends.

A kernel whose vector lanes are tokens stages its activations transposed (``X_t[k, m] =
X[m, k]``) and writes its result tile back transposed (``Y[m, n] = Y_t[n, m]``). As scalar loops
these copies cost ~3 cycles an element, as much as a 90%-sparse 384-wide layer's multiply-adds
(docs/BENCHMARKS.md, "Transposes"). ``vector_transposes`` rewrites every such copy nest into 8 x 8
blocks, each one ``Transpose``: 8 vector loads, 24 two-input shuffles (``shuffles``), 8 vector
stores. A block that is not whole (a guard of the copy fails somewhere in it) runs the original
scalar loops.
"""

from __future__ import annotations

from dataclasses import replace

from sparsedsl.ir import loop_ir as L
from sparsedsl.ir.schedule import rewrite_loads, substitute, used_names

LANES = 8
_WIDE = ("float32", "int32")  # 8 lanes fill a 256-bit vector


def shuffles() -> list[tuple[str, str, str, tuple[int, ...]]]:
    """The 8 x 8 transpose of vectors ``r0``..``r7`` into ``o0``..``o7`` (``o[c][r] = r[r][c]``) as
    two-input shuffles ``(result, first, second, lanes)``, lane ``i < 8`` of the first input, ``8
    + i`` of the second: unpack within 128-bit halves, pair the 64-bit parts, then swap halves
    (each one instruction on AVX: vunpck*ps, vshufps, vperm2f128)."""
    steps = []
    for i in range(0, 8, 2):  # t: pairs of rows interleaved
        steps.append((f"t{i}", f"r{i}", f"r{i + 1}", (0, 8, 1, 9, 4, 12, 5, 13)))
        steps.append((f"t{i + 1}", f"r{i}", f"r{i + 1}", (2, 10, 3, 11, 6, 14, 7, 15)))
    for i in (0, 1, 4, 5):  # u: 64-bit pairs of two interleavings
        steps.append((f"u{i}", f"t{i}", f"t{i + 2}", (0, 1, 8, 9, 4, 5, 12, 13)))
        steps.append((f"u{i + 2}", f"t{i}", f"t{i + 2}", (2, 3, 10, 11, 6, 7, 14, 15)))
    for i in range(4):  # o: 128-bit halves of u_i and u_{i+4}
        order = (0, 2, 1, 3)[i]  # u0, u2, u1, u3 hold columns 0-1, 2-3... of rows 0-3 (low halves)
        steps.append((f"o{i}", f"u{order}", f"u{order + 4}", (0, 1, 2, 3, 8, 9, 10, 11)))
        steps.append((f"o{i + 4}", f"u{order}", f"u{order + 4}", (4, 5, 6, 7, 12, 13, 14, 15)))
    return steps


def vector_transposes(func: L.LoopFunc) -> L.LoopFunc:
    """``func`` with its transposing copy nests done in 8 x 8 blocks of shuffles."""
    taken = used_names(func)
    return replace(func, body=_rewrite(func.body, taken))


def _rewrite(s: L.Stmt, taken: set[str]) -> L.Stmt:
    match s:
        case L.For(body=body):
            blocked = _blocked(s, taken)
            return blocked if blocked is not None else L.with_body(s, _rewrite(body, taken))
        case L.Seq(stmts):
            return L.Seq(tuple(_rewrite(x, taken) for x in stmts))
        case L.If(cond, then):
            return L.If(cond, _rewrite(then, taken))
    return s


def _along(indices: tuple[L.Expr, ...], names: tuple[str, str]) -> str | None:
    """The loop (of ``names``) that a buffer access runs along: its last index is ``v`` or ``e +
    v`` (``e`` free of both loops), and no other index reads ``v``."""
    last = indices[-1]
    match last:
        case L.Var(v) if v in names:
            pass
        case L.Bin("+", e, L.Var(v)) if v in names and not any(L.uses(e, n) for n in names):
            pass
        case _:
            return None
    return v if not any(L.uses(i, v) for i in indices[:-1]) else None


def _conjuncts(cond: L.Expr | None) -> list[L.Expr]:
    match cond:
        case None:
            return []
        case L.Bin("and", a, b):
            return [*_conjuncts(a), *_conjuncts(b)]
    return [cond]


def _whole(conjunct: L.Expr, names: tuple[str, str], last: dict[str, L.Expr]) -> L.Expr | None:
    """A condition that ``conjunct`` holds over a whole block: itself where it reads neither loop,
    else at the block's last value of the one loop it reads, if it grows with it (``e + v <
    bound``); None for another form."""
    read = [n for n in names if L.uses(conjunct, n)]
    if not read:
        return conjunct
    if len(read) == 2:
        return None
    match conjunct:
        case L.Bin("<", L.Var(v) | L.Bin("+", _, L.Var(v)) as e, bound) if v == read[0] and not L.uses(bound, v):
            if isinstance(e, L.Bin) and L.uses(e.a, v):
                return None
            return L.Bin("<", substitute(e, v, last[v]), bound)
    return None


def _conversion(store: L.Store) -> tuple[L.Load, L.Expr | None] | None:
    """The element a copy's store reads and what it makes of it: None for the element itself (a
    plain copy, the same type), or an expression of ``L.element`` converting it to the output's
    type (a float tile rounded and saturated into an int8 output: ``int8(max(min(round_even(x),
    127), -128))``: casts, rounding, clamps and constants only). None for any other store (an
    epilogue applied on the way out, another read, a loop variable)."""
    value = store.value
    if isinstance(value, L.Load):
        return (value, None) if value.buffer.dtype == store.buffer.dtype else None
    loads = {e for e in L.subexprs(value) if isinstance(e, L.Load)}
    if len(loads) != 1 or not isinstance(value, L.Cast):
        return None
    (load,) = loads
    x = L.element(load.buffer.dtype)
    convert = rewrite_loads(value, lambda _: x)
    return (load, convert) if all(_converts(e) or e == x for e in L.subexprs(convert)) else None


def _converts(e: L.Expr) -> bool:
    """Whether ``e`` is a node of a type conversion (``lowering._cast``'s)."""
    match e:
        case L.Cast() | L.Const():
            return True
        case L.Bin(op):
            return op in ("min", "max")
        case L.Call(func):
            return func == "round_even"
    return False


def _blocked(outer: L.For, taken: set[str]) -> L.Stmt | None:
    """The nest ``for a: for b: [if cond:] D[...] = S[...]`` copying a transposed 32-bit tile, in
    8 x 8 blocks (None when ``outer`` is not such a nest)."""
    inner = outer.body
    if not isinstance(inner, L.For):
        return None
    loops = (outer, inner)
    if any(
        f.kind is not L.LoopKind.SERIAL
        or f.start != L.const(0)
        or not isinstance(f.extent, L.Const)
        or f.extent.value % LANES
        for f in loops
    ):
        return None
    body, cond = inner.body, None
    if isinstance(body, L.If):
        body, cond = body.then, body.cond
    if not isinstance(body, L.Store) or body.atomic:
        return None
    store, read = body, _conversion(body)
    if read is None:
        return None
    load, convert = read
    if load.buffer.dtype not in _WIDE or load.buffer == store.buffer:
        return None  # (a copy within one buffer: the block's loads before its stores would change it)
    names = (outer.var.name, inner.var.name)
    src_v, dst_v = _along(load.indices, names), _along(store.indices, names)
    if src_v is None or dst_v is None or src_v == dst_v:
        return None
    block = {n: L.Var(f"{n}_b8") for n in names}
    if any(b.name in taken for b in block.values()):
        return None
    first = {n: L.mul(block[n], L.const(LANES)) for n in names}
    last = {n: L.add(first[n], L.const(LANES - 1)) for n in names}
    wholes = [_whole(c, names, last) for c in _conjuncts(cond)]
    if any(w is None for w in wholes):
        return None

    def at(indices: tuple[L.Expr, ...], lane_var: str, lane: int, run_var: str) -> tuple[L.Expr, ...]:
        fixed = tuple(substitute(i, lane_var, L.add(first[lane_var], L.const(lane))) for i in indices)
        return tuple(substitute(i, run_var, first[run_var]) for i in fixed)

    # source vector r runs along src_v at dst_v = first + r; destination vector c along dst_v
    transpose = L.Transpose(
        store.buffer,
        tuple(at(store.indices, src_v, c, dst_v) for c in range(LANES)),
        load.buffer,
        tuple(at(load.indices, dst_v, r, src_v) for r in range(LANES)),
        convert,
    )
    body_of_block: L.Stmt = transpose
    if wholes:
        whole = wholes[0]
        for w in wholes[1:]:
            whole = L.Bin("and", whole, w)
        flag = L.Var(f"{names[0]}_{names[1]}_whole")
        lanes = {n: L.Var(f"{n}_l8") for n in names}
        scalar = inner.body
        for n in names:
            scalar = substitute(scalar, n, L.add(first[n], lanes[n]))
        for n in reversed(names):
            scalar = L.For(lanes[n], L.const(0), L.const(LANES), scalar)
        body_of_block = L.seq(
            L.Let(flag, L.Select(whole, L.const(1), L.const(0))),
            L.If(L.Bin("==", flag, L.const(1)), transpose),
            L.If(L.Bin("==", flag, L.const(0)), scalar),
        )
    inner_blocks = L.For(block[names[1]], L.const(0), L.const(inner.extent.value // LANES), body_of_block)
    return L.For(block[names[0]], L.const(0), L.const(outer.extent.value // LANES), inner_blocks)
