"""TVM's CUDA code generator: GPU-mapped loop IR (ir/gpu.py) -> tirx -> CUDA C."""

from __future__ import annotations

import tvm

from sparsedsl.backends.tvm.tir import to_tir
from sparsedsl.errors import BackendError
from sparsedsl.ir import loop_ir as L
from sparsedsl.ir.gpu import launch_dims


def generate(funcs: list[L.LoopFunc], arch: str) -> tuple[str, str]:
    """The CUDA C of GPU-mapped loop functions for ``arch``, and their TIR (for ``emit``)."""
    prims = {f.name: to_tir(f, llvm=False) for f in funcs}
    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    config = {
        # TVM's storage rewrite would let the accumulator spill reuse the staged tile's shared
        # memory, under wmma pointers typed for the tile
        "tirx.disable_storage_rewrite": any(f.meta.get("tensor_cores") for f in funcs),
        # host-side common subexpressions (a grid size two kernels share) would become kernel
        # parameters that no launch provides
        "tirx.disable_cse_tir": any(len(launch_dims(f)) > 1 for f in funcs),
    }
    try:
        with tvm.transform.PassContext(config=config):
            source = tvm.compile(tvm.IRModule(prims), target=target).mod.imports[0].inspect_source()
    except Exception as err:  # noqa: BLE001 - TVM raises its own internal error types
        raise BackendError(f"CUDA build of '{funcs[0].name}' failed: {str(err).strip().splitlines()[-1]}") from None
    return str(source), "\n\n".join(p.script() for p in prims.values())
