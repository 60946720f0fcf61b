"""The serial meaning of GPU-mapped loop IR, runnable on the CPU.

Every GPU rewrite (``ir/gpu.py``, ``ir/staging.py``, ``ir/tensor_cores.py``) keeps the loop IR's
serial reading exact: grid and thread loops may run one after another, a sum bound to threads is a
sum, thread-private arrays are indexed by the thread. ``serial_equivalent`` turns a mapped function
into a CPU function with that reading, so tests check a GPU mapping's numbers without a GPU.
"""

from __future__ import annotations

from dataclasses import replace

from sparsedsl.ir import loop_ir as L
from sparsedsl.ir.schedule import map_buffer, rewrite_loops, rewrite_stores

_GPU = (L.LoopKind.BLOCK_X, L.LoopKind.BLOCK_Y, L.LoopKind.THREAD_X)


def serial_equivalent(func: L.LoopFunc) -> L.LoopFunc:
    """The GPU-mapped function as a CPU program with the same meaning: grid and thread loops run
    one after another, atomic adds are plain ones, shared, thread-private and fragment buffers are
    plain local arrays, and tensor-core tile statements are loops."""

    def serial(s: L.Stmt) -> L.Stmt | None:
        return replace(s, kind=L.LoopKind.SERIAL) if s.kind in _GPU else None

    body = rewrite_loops(_expand_tiles(func.body), serial)
    body = rewrite_stores(body, lambda st: replace(st, atomic=False))
    for buf in L.allocs(body):
        if buf.scope not in ("global", "local"):  # shared, thread-private, tensor-core fragments
            body = map_buffer(body, buf.name, replace(buf, scope="local"), lambda idx: idx)
    return replace(func, body=body)


def _expand_tiles(s: L.Stmt) -> L.Stmt:
    """Tile statements as loops over the tile's rows ``r`` and columns ``c`` (and ``k`` for mma)."""
    r, c, k = L.Var("in_tile_r"), L.Var("in_tile_c"), L.Var("in_tile_k")

    def element(tile, row, col):
        return (L.add(L.mul(tile[0], L.const(L.TILE)), row), L.add(L.mul(tile[1], L.const(L.TILE)), col))

    def grid(body: L.Stmt, *axes: L.Var) -> L.Stmt:
        for axis in reversed(axes):
            body = L.For(axis, L.const(0), L.const(L.TILE), body)
        return body

    match s:
        case L.For(body=body):
            return replace(s, body=_expand_tiles(body))
        case L.If(cond, then):
            return L.If(cond, _expand_tiles(then))
        case L.Seq(stmts):
            return L.Seq(tuple(_expand_tiles(st) for st in stmts))
        case L.TileFill(frag, tile):
            return grid(L.Store(frag, element(tile, r, c), L.const(0.0, frag.dtype)), r, c)
        case L.TileCopy(frag, tile, memory, offset, ld, load):
            fragment, block = element(tile, r, c), L.unflatten(L.add(offset, L.add(L.mul(r, ld), c)), memory.shape)
            if load:
                return grid(L.Store(frag, fragment, L.Load(memory, block)), r, c)
            return grid(L.Store(memory, block, L.Load(frag, fragment)), r, c)
        case L.TileMma(acc, acc_tile, a, a_tile, b, b_tile):
            target = element(acc_tile, r, c)
            product = L.mul(
                L.Cast(acc.dtype, L.Load(a, element(a_tile, r, k))), L.Cast(acc.dtype, L.Load(b, element(b_tile, k, c)))
            )
            return grid(L.Store(acc, target, L.add(L.Load(acc, target), product)), r, c, k)
    return s
