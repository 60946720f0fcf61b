"""A kernel's CPU variants for one format: what its schedule's directives ask of the lowering
(``lower_options``), the lowering itself (K-blocked where the format allows), and either the
user's loop directives applied or the default schedule's variants, among which a call picks
(``schedule.pick``) or measures (runtime/tuning.py): token tiles or output rows in parallel at
the tile whose accumulators fit the registers, a 16-token tile for a few tokens and a one-token
tile for one. The runtime only looks the directives up and says how wide the host's vectors are.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial

from sparsedsl.errors import ScheduleError
from sparsedsl.ir import kernel_ir as K
from sparsedsl.ir import loop_ir as L
from sparsedsl.ir import schedule as sched
from sparsedsl.ir.buffer_names import ACC
from sparsedsl.ir.lowering import KBlock, LowerOptions, lower
from sparsedsl.ir.prefetch import prefetched
from sparsedsl.ir.windows import permute_lanes, windowed

SMALL_TILE = 16
# K-blocking: the staged activations of one block of the sum, this many bytes, are what every row
# rereads (from L1 and L2) instead of the whole tile; measured on znver3 (32 KiB L1) against 16, 32,
# 64 and 96 KiB (docs/BENCHMARKS.md, "K-blocking"): 48 KiB was best or tied on every N:M shape
L1_BLOCK_BYTES = 48 * 1024
ONE_TOKEN_COPIES = 4  # stored blocks summed at once, each into its own partial sums (one token)
FEW_TOKEN_COPIES = 4  # stored values summed at once into their own vectors of partial sums (a few tokens)


def _sparse_indices(kernel: K.Kernel) -> set[str]:
    sparse = kernel.sparse_input
    return {i for a in K.accesses(kernel.value) if sparse and a.tensor == sparse.name for i in a.indices}


def lower_options(directives, kernel: K.Kernel) -> LowerOptions:
    """The lowering options a schedule's ``tile``, ``layout`` and ``block`` directives ask for,
    checked against the kernel (a located ScheduleError otherwise)."""
    tile, stage, no_stage = LowerOptions.tile, set(), set()
    explicit, block = False, None
    for d in directives:
        if d.verb == "tile":
            token = next((i for i in kernel.indices if i not in _sparse_indices(kernel)), None)
            if d.loops[0].text != token:
                what = f"the token index is '{token}'" if token else "this kernel has no token index to tile"
                raise ScheduleError(f"cannot tile '{d.loops[0].text}': {what}", d.loops[0].span)
            tile = d.factor
        elif d.verb == "block":
            sums = [e for s in kernel.statements for e in K.subexprs(s.value) if isinstance(e, K.KSum)]
            summed = {i for e in sums for i in e.indices}
            if d.loops[0].text not in summed:
                raise ScheduleError(
                    f"cannot block '{d.loops[0].text}': it is not an index kernel '{kernel.name}' sums over "
                    f"(it sums over {', '.join(sorted(summed)) or 'none'})",
                    d.loops[0].span,
                )
            block = KBlock(d.loops[0].text, d.factor, d.span)
        elif d.verb == "layout":
            tensor, *order = [n.text for n in d.loops]
            accesses = [a for a in K.accesses(kernel.value) if a.tensor == tensor]
            if not accesses:
                raise ScheduleError(f"'{tensor}' is not a tensor read by kernel '{kernel.name}'", d.loops[0].span)
            natural = list(accesses[0].indices)
            if sorted(order) != sorted(natural):
                raise ScheduleError(f"layout of '{tensor}' must order its indices {', '.join(natural)}", d.span)
            if order == natural:
                no_stage.add(tensor)
            elif len(order) >= 2 and order[:-1] == [i for i in natural if i != order[-1]]:
                stage.add(tensor)
                explicit = True
            else:
                raise ScheduleError(f"layout of '{tensor}' can keep its order or move the token index last", d.span)
    return LowerOptions(tile, frozenset(stage) if explicit else None, frozenset(no_stage), block=block)


def register_lanes(vector_bits: int) -> int:
    """The f32 lanes of half the vector registers of ``vector_bits``-wide vectors: 8 of AVX2's 16
    ymm, 16 of AVX-512's 32 zmm (the rest hold the operands)."""
    return (vector_bits // 32) * (16 if vector_bits >= 512 else 8)


def register_tile(func: L.LoopFunc, tile: int, vector_bits: int) -> int:
    """The token tile for ``func`` lowered with ``tile``: the widest power-of-two part of it, down
    to ``SMALL_TILE``, whose accumulators (the constant-size local buffers with the tile last: a
    ``[4, tile]`` block row of BSR(4, 1)) fit ``register_lanes``; ``tile`` when none does (they
    spill either way, and a wide tile reads the weight fewer times). A 4 x 64 block row in 32 ymm
    registers spilled: 2.5x the time of a 16-token tile on AVX2 (docs/BENCHMARKS.md, "Token tile
    and registers")."""
    budget = register_lanes(vector_bits)
    rows = 1
    for buf in L.allocs(func.body):
        if buf.shape and all(isinstance(d, L.Const) for d in buf.shape) and buf.shape[-1] == L.const(tile):
            rows = max(rows, math.prod(d.value for d in buf.shape[:-1]))
    fit = tile
    while fit > SMALL_TILE and rows * fit > budget:
        fit //= 2
    return fit if rows * fit <= budget else tile


def lower_blocked(kernel: K.Kernel, opts: LowerOptions) -> L.LoopFunc:
    """The kernel lowered with K-blocking: the schedule's ``block``, else (a tile of several tokens)
    blocks of ``L1_BLOCK_BYTES`` of staged activations where the format bounds a block without a
    search (N:M, VNM: ``lowering.KBlock``), unblocked where it does not (CSR, ELL, BSR, COO)."""
    if opts.block is not None or opts.tile == 1:
        return lower(kernel, opts)
    try:
        return lower(kernel, replace(opts, block=KBlock(None, L1_BLOCK_BYTES // (4 * opts.tile))))
    except ScheduleError:
        return lower(kernel, opts)


def one_token_lanes(vector_bits: int) -> int:
    """Stored values a vector of partial sums takes at once (one token): a float32 register's
    lanes, at least 8. AVX-512's 16 halve the permutes of an N:M row's windows: measured at one
    token through 4096 x 4096, NM(1, 4) 0.37-0.39 -> 0.24 of ``F.linear`` (docs/BENCHMARKS.md)."""
    return max(8, vector_bits // 32)


def _one_token(func: L.LoopFunc, vector_bits: int) -> L.LoopFunc:
    """A one-token variant with its sum over a row's stored values in vector lanes (or where a
    stored block holds several rows, ``BSR(4, 1)``, the rows in the lanes), the vectors summed in
    ``ONE_TOKEN_COPIES`` interleaved partial sums: without tokens to vectorise over, each add
    would wait on the one before (``sched.vector_sums``, ``sched.interleaved_sums``). Where the
    CPU has a variable permute (AVX2 on: ``windows.permute_lanes``), the activations of an N:M
    row's lanes are read as one window and permuted (``ir/windows.py``) instead of gathered; the
    stored values and coordinates are fetched ahead (``ir/prefetch.py``)."""
    reduction = func.meta.get("sparse_reduction")
    if reduction is None:
        return func
    summed = sched.vector_sums(func, reduction, one_token_lanes(vector_bits))
    if summed is func:
        return sched.interleaved_sums(func, reduction, ONE_TOKEN_COPIES)
    summed = sched.interleaved_sums(summed, sched.groups_of(reduction), ONE_TOKEN_COPIES)
    return prefetched(windowed(summed, permute_lanes(vector_bits)))


def _few_tokens(kernel: K.Kernel, func: L.LoopFunc) -> L.LoopFunc:
    """A few-token variant with its sum over a row's stored values in ``FEW_TOKEN_COPIES``
    interleaved vectors of partial sums: a row of one value a step (CSR, N:M) adds one vector of
    the tile's tokens per stored value, each add waiting on the one before (``sched.interleaved_sums``
    leaves a block of several rows, whose rows are independent sums already, alone). Kernels of
    float32 inputs only: integer and bf16 products are summed by dot-product instructions
    (``ir/dot_products.py``), which match the sum as the lowering wrote it."""
    reduction = func.meta.get("sparse_reduction")
    if reduction is None or any(p.dtype != "float32" for p in kernel.inputs):
        return func
    return sched.interleaved_sums(func, reduction, FEW_TOKEN_COPIES)


def _measured_only(func: L.LoopFunc) -> L.LoopFunc:
    """A variant that only a measurement picks (``sched.pick``'s rule never does): half the token
    tile, its tiles in parallel, which wins where the whole tile's staged activations ([K, tile])
    and results ([N, tile]) outgrow the caches: measured with 64 tokens a tile, 1536 x 384 at 1024
    tokens 3.3 -> 1.3 ms, 384 x 384 and 384 x 1536 within 10% (docs/BENCHMARKS.md)."""
    return replace(func, meta={**func.meta, "measured_only": True})


def _jammed(kernel: K.Kernel, func: L.LoopFunc, opts: LowerOptions) -> L.LoopFunc:
    """A row-wise kernel with its rows of a dense product (attention's scores, one key a row)
    summed several at a time into the registers (``sched.jammed_rows``)."""
    return sched.jammed_rows(func, ACC, opts.register_lanes) if kernel.rowwise else func


def cpu(kernel: K.Kernel, opts: LowerOptions, directives, vector_bits: int) -> dict[str, L.LoopFunc]:
    """The variants of ``kernel`` lowered with ``opts`` (``lower_options`` of ``directives``) for a
    CPU whose vectors are ``vector_bits`` wide, by name."""
    opts = replace(opts, register_lanes=register_lanes(vector_bits))
    func = lower_blocked(kernel, opts)
    loop_directives = [d for d in directives if d.verb not in ("tile", "layout", "block")]
    if loop_directives:
        return {"scheduled": sched.apply(func, loop_directives)}
    tiled = any(d.verb == "tile" for d in directives)
    fit = opts.tile if tiled else register_tile(func, opts.tile, vector_bits)
    if fit != opts.tile:
        opts = replace(opts, tile=fit)
        func = lower_blocked(kernel, opts)
    variants = sched.default(func)
    if func.meta.get("token") and not tiled:
        # half the tile, its tiles in parallel, for a measured choice (``_measured_only``);
        # decode-sized calls: a 16-token tile for a few tokens, a 1-token tile for one (a big
        # tile wastes most of its work); one tile has only its rows to share out. A tile no
        # narrower than the default's (BSR(4, 1) on AVX2 already tiles 16) would compile it again
        narrower = (
            ("half", opts.tile // 2, "tiles", _measured_only),
            ("small", SMALL_TILE, "rows", partial(_few_tokens, kernel)),
            ("one", 1, "rows", partial(_one_token, vector_bits=vector_bits)),
        )
        for suffix, tile, wanted, finish in narrower:
            if tile >= opts.tile or (suffix == "half" and tile <= SMALL_TILE):
                continue
            few = sched.default(lower_blocked(kernel, replace(opts, tile=tile)))
            kind = wanted if wanted in few else next(iter(few))
            variants[f"{kind}_{suffix}"] = finish(few[kind])
        variants = {k: replace(v, name=f"{kernel.name}_{k}") for k, v in variants.items()}
    # after the default schedule, which marks parallel loops by name: a jammed loop keeps its kind
    return {k: _jammed(kernel, v, opts) for k, v in variants.items()}
