"""Software prefetches for the streams of a one-token kernel.

One token through a sparse weight reads each stored value and coordinate once, in order: two
streams from memory and a few instructions a value. The hardware prefetchers keep too few lines
in flight for them: measured on a 2-core Xeon (4096 x 4096, one token), an NM(2, 4) kernel read
its 40 MB at 8 GB/s a core where ``F.linear`` reads its 64 MB at 14, so the kernel took as long as
the dense product. Fetching each stream ``AHEAD_BYTES`` ahead took it from 1.03 to 0.68 of
``F.linear`` (NM(1, 4): 0.43 to 0.37; docs/BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import replace

from sparsedsl.ir import loop_ir as L
from sparsedsl.ir.schedule import rewrite_loops, substitute
from sparsedsl.ir.staging import BYTES

AHEAD_BYTES = 4096  # how far ahead of its reads a stream is fetched


def prefetched(func: L.LoopFunc) -> L.LoopFunc:
    """``func`` with a prefetch before each of its vector loops for every one-dimensional argument
    buffer the loop reads at a position known before it (not one a ``let`` in the loop gives): the
    element ``AHEAD_BYTES`` past the one its first lane reads, kept inside the buffer (``min``
    with its last element)."""
    params = {p.name for p in func.params if isinstance(p, L.Buffer) and len(p.shape) == 1}

    def before(loop: L.For) -> L.Stmt | None:
        if loop.kind is not L.LoopKind.VECTORIZED:
            return None
        inner = [st.var.name for st in L.leaves(loop.body) if isinstance(st, L.Let)]
        fetches, seen = [], set()
        for load in L.loads(loop.body):
            buf = load.buffer
            if buf.name not in params or buf.name in seen or buf.dtype not in BYTES:
                continue
            if any(L.uses(load.indices[0], name) for name in inner):
                continue
            seen.add(buf.name)
            first = substitute(load.indices[0], loop.var.name, loop.start)
            ahead = L.add(first, L.const(AHEAD_BYTES // BYTES[buf.dtype]))
            fetches.append(L.Prefetch(buf, (L.minimum(ahead, L.sub(buf.shape[0], L.const(1))),)))
        return L.seq(*fetches, loop) if fetches else None

    return replace(func, body=rewrite_loops(func.body, before))
