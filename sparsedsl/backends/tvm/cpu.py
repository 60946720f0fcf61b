"""TVM's LLVM backend for the host CPU: loop IR -> tirx -> tvm.compile -> a callable."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

import tvm

from sparsedsl.backends.tvm.tir import to_tir
from sparsedsl.errors import BackendError
from sparsedsl.ir import loop_ir as L
from sparsedsl.runtime.program import num_threads


@cache
def host_cpu() -> str:
    """The LLVM name of this machine's CPU (``znver4``...): kernels are built for it."""
    return str(tvm.target.codegen.llvm_get_system_cpu())


def _size_thread_pool() -> None:
    """TVM sizes its pool from ``TVM_NUM_THREADS`` when a kernel first runs a parallel loop; left
    alone it may use a single worker on small machines. A user's own setting wins."""
    os.environ.setdefault("TVM_NUM_THREADS", str(num_threads()))


def host_target(threads: int | None = None) -> tvm.target.Target:
    """The dict-form LLVM target for this CPU (string targets are rejected by TVM 0.27)."""
    cores = threads or num_threads()
    return tvm.target.Target(
        {"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu", "mcpu": host_cpu(), "num-cores": cores}
    )


@dataclass
class Built:
    """Compiled kernel variants: the TVM module, its functions by name and their TIR."""

    module: tvm.runtime.Module
    functions: dict[str, object]
    tir: str

    def source(self, stage: str) -> str:
        if stage == "tir":
            return self.tir
        if stage in ("llvm", "ll"):
            return self.module.mod.inspect_source("ll")
        if stage == "asm":
            return self.module.mod.inspect_source("asm")
        raise BackendError(f"unknown stage '{stage}' for the cpu target (tir, llvm, asm)")


def build(funcs: list[L.LoopFunc]) -> Built:
    """Compile loop-IR functions (variants of one kernel) into one module for the host CPU."""
    dtypes = {p.dtype for f in funcs for p in f.params}
    if "bfloat16" in dtypes:
        raise BackendError("bf16 kernels are not supported by TVM's CPU code generator here; use f32 or f16")
    _size_thread_pool()
    prims = {f.name: to_tir(f) for f in funcs}
    try:
        module = tvm.compile(tvm.IRModule(prims), target=host_target())
    except Exception as err:  # TVM raises its own internal error types
        raise BackendError(f"TVM could not compile kernel '{funcs[0].name}': {str(err).splitlines()[-1]}") from None
    tir = "\n\n".join(p.script() for p in prims.values())
    return Built(module, {name: module[name] for name in prims}, tir)
