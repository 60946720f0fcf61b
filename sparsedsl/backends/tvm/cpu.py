"""TVM's LLVM backend for the host CPU: loop IR -> tirx -> tvm.compile -> a callable."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

import tvm

from sparsedsl.backends.tvm.tir import to_tir
from sparsedsl.errors import BackendError
from sparsedsl.ir import loop_ir as L


@cache
def host_cpu() -> str:
    """The LLVM name of this machine's CPU (``znver4``...): kernels are built for it."""
    return str(tvm.target.codegen.llvm_get_system_cpu())


def host_target(threads: int | None = None) -> tvm.target.Target:
    """The dict-form LLVM target for this CPU (string targets are rejected by TVM 0.27)."""
    cores = threads or int(os.environ.get("SPARSEDSL_NUM_THREADS", 0)) or os.cpu_count() or 1
    return tvm.target.Target(
        {"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu", "mcpu": host_cpu(), "num-cores": cores}
    )


@dataclass
class Built:
    """A compiled kernel: the TVM module, its entry function and its TIR."""

    module: tvm.runtime.Module
    function: object
    tir: str

    def source(self, stage: str) -> str:
        if stage == "tir":
            return self.tir
        if stage in ("llvm", "ll"):
            return self.module.mod.inspect_source("ll")
        if stage == "asm":
            return self.module.mod.inspect_source("asm")
        raise BackendError(f"unknown stage '{stage}' for the cpu target (tir, llvm, asm)")


def build(func: L.LoopFunc) -> Built:
    """Compile a loop-IR function for the host CPU."""
    dtypes = {p.dtype for p in func.params}
    if "bfloat16" in dtypes:
        raise BackendError("bf16 kernels are not supported by TVM's CPU code generator here; use f32 or f16")
    prim = to_tir(func)
    try:
        module = tvm.compile(tvm.IRModule({func.name: prim}), target=host_target())
    except Exception as err:  # TVM raises its own internal error types
        raise BackendError(f"TVM could not compile kernel '{func.name}': {str(err).splitlines()[-1]}") from None
    return Built(module, module[func.name], prim.script())
