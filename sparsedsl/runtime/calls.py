"""Bound calls: what a CPU kernel call works out from its arguments, kept for the next call of the
same shapes.

A call checks every argument against the kernel's signature, binds the shape names, picks the
compiled variant and the thread count, and lays out the compiled function's arguments: ~40 µs of
Python, more than a small layer's work. A model calls each layer with the same shapes again and
again, so all of it is kept in a ``BoundCall`` under the arguments' ``signature`` (shapes, dtypes,
layout, and the validation stamp of the sparse argument, which changes whenever its index buffers
do), and a call whose signature was seen only fills in the tensors' data pointers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sparsedsl.errors import PackError
from sparsedsl.ir import kernel_ir as K
from sparsedsl.runtime.sparse_tensor import STAMP, SparseTensor

MAX_BOUND = 256  # signatures kept per kernel: one per layer of a model that shares the kernel
PARALLEL_WORK = 1 << 15  # multiply-adds below which a call runs on one thread: the fork costs more


def signature(args: Sequence, threads: int) -> tuple | None:
    """What decides a bound call: each tensor's shape, dtype and layout, the identity of the sparse
    argument's validation stamp, and the thread count; None when an argument must go through the
    full checks (a sparse tensor whose structure does not validate)."""
    key: list = [threads]
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((a.shape, a.dtype, a.is_cpu, a.is_contiguous()))
        elif isinstance(a, SparseTensor):
            try:
                a.check()  # O(1) unless an index buffer was replaced or written since its stamp
            except PackError:
                return None
            key.append(id(getattr(a.values, STAMP)))
        else:
            key.append(type(a))
    return tuple(key)


def threads_for(work: int, threads: int) -> int:
    """Threads for a call of ``work`` multiply-adds: one when forking would cost more than it saves."""
    return max(1, min(threads, work // PARALLEL_WORK))


@dataclass
class BoundCall:
    """One compiled variant bound to one signature. ``run(flat, threads)`` is the backend's
    prepared function; ``template`` its arguments with the sizes filled in and the rest taken
    per call: ``from_args`` (position, argument index), ``from_sparse`` (position, buffer key),
    ``scalars`` (position, argument index: a Python number or a one-element tensor), ``out``
    the output's position."""

    run: Callable[[Sequence, int], None]
    threads: int
    template: list
    from_args: list[tuple[int, int]]
    from_sparse: list[tuple[int, str]]
    scalars: list[tuple[int, int]]
    out: int
    out_shape: tuple[int, ...] | None  # None: the values of the sparse argument's pattern
    out_dtype: torch.dtype
    sparse_index: int | None
    stamp: tuple | None  # kept so that its id, part of the signature, is not reused

    @classmethod
    def lay_out(
        cls,
        run: Callable[[Sequence, int], None],
        threads: int,
        plan: list[tuple[str, object]],
        kernel: K.Kernel,
        sizes: dict[str, int],
        out: tuple[tuple[int, ...] | None, torch.dtype],
        stamp: tuple | None,
    ) -> BoundCall:
        """The bound call running ``run`` on ``threads`` threads, its arguments in the order of
        ``plan`` (``Instance.plan``: where each comes from) for a call of ``kernel`` with ``sizes``."""
        index = {p.name: i for i, p in enumerate(kernel.inputs)}
        scalar = {p.name for p in kernel.inputs if p.shape is None}
        template, from_args, from_sparse, scalars, out_position = [], [], [], [], 0
        for position, (kind, key) in enumerate(plan):
            template.append(sizes[key] if kind == "size" else None)
            if kind == "arg":
                (scalars if key in scalar else from_args).append((position, index[key]))
            elif kind == "sparse":
                from_sparse.append((position, key))
            elif kind == "out":
                out_position = position
        sparse_index = next((i for i, p in enumerate(kernel.inputs) if p.sparse), None)
        return cls(run, threads, template, from_args, from_sparse, scalars, out_position, *out, sparse_index, stamp)

    def __call__(self, args: Sequence):
        sparse = args[self.sparse_index] if self.sparse_index is not None else None
        if self.out_shape is None:
            result = torch.empty_like(sparse.values, dtype=self.out_dtype)
        else:  # a shape as separate ints: ~0.7 µs faster to parse than a tuple
            result = torch.empty(*self.out_shape, dtype=self.out_dtype)
        flat = self.template.copy()
        for position, index in self.from_args:
            flat[position] = args[index]
        if self.from_sparse:
            buffers = sparse.buffers
            for position, key in self.from_sparse:
                flat[position] = buffers[key]
        for position, index in self.scalars:
            value = args[index]
            flat[position] = float(value.item() if isinstance(value, torch.Tensor) else value)
        flat[self.out] = result
        self.run(flat, self.threads)
        return sparse.with_values(result) if self.out_shape is None else result


class BoundCalls:
    """A kernel's bound calls by signature, the oldest dropped beyond ``MAX_BOUND``: ``get(key)``
    (None for a key of None, which is never kept) and ``put(key, call)``. A model calls its layers
    in turn, so keeping the least recently used instead would keep no more of them, and would
    cost a reordering on every call."""

    def __init__(self) -> None:
        self.calls: dict[tuple, BoundCall] = {}
        self.get = self.calls.get

    def put(self, key: tuple | None, call: BoundCall) -> None:
        if key is None:
            return
        self.calls[key] = call
        while len(self.calls) > MAX_BOUND:
            with contextlib.suppress(StopIteration, KeyError, RuntimeError):  # another thread's put
                del self.calls[next(iter(self.calls))]
