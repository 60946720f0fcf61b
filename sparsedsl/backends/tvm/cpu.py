"""TVM's LLVM backend for the host CPU: loop IR -> tirx -> tvm.compile -> a callable."""

from __future__ import annotations

import ctypes
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache as memoize
from pathlib import Path

import tvm

from sparsedsl import cache
from sparsedsl.backends import host
from sparsedsl.backends.tvm import pool
from sparsedsl.backends.tvm.direct import DirectCall, entry_point
from sparsedsl.backends.tvm.tir import to_tir
from sparsedsl.config import num_threads
from sparsedsl.errors import BackendError
from sparsedsl.ir import loop_ir as L
from sparsedsl.ir.transposes import vector_transposes

_CPU = {"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu"}  # a host target before its CPU is named


@memoize
def host_cpu() -> str:
    """The LLVM name of this machine's CPU (``znver4``...): kernels are built for it."""
    return str(tvm.target.codegen.llvm_get_system_cpu())


def code_features() -> list[str]:
    """The instruction-set extensions that code built for the host target may use: those LLVM
    enables for its ``mcpu``, less those this CPU hides (tuning flags left out)."""
    return _features(host_target())


@memoize
def hidden_features() -> tuple[str, ...]:
    """Extensions that LLVM assumes for this CPU's name but this CPU does not report (a virtual
    machine may hide AVX-512 from a CPU that has it): the host target turns them off, or kernels
    would stop at their first such instruction."""
    return tuple(f for f in _features(tvm.target.Target({**_CPU, "mcpu": host_cpu()})) if f not in host.present())


def _features(target: tvm.target.Target) -> list[str]:
    return host.used_in_code(str(f) for f in tvm.target.codegen.llvm_get_cpu_features(target))


def host_target(threads: int | None = None) -> tvm.target.Target:
    """The dict-form LLVM target for this CPU (string targets are rejected by TVM 0.27)."""
    target = {**_CPU, "mcpu": host_cpu(), "num-cores": threads or num_threads()}
    if hidden_features():
        target["mattr"] = [f"-{f}" for f in hidden_features()]
    return tvm.target.Target(target)


@dataclass
class Built:
    """Compiled kernel variants: the TVM module, its functions by name and their TIR."""

    module: tvm.runtime.Module
    functions: dict[str, object]
    prims: dict[str, tvm.tirx.PrimFunc]
    image: bytes | None = None  # the shared library it was loaded from, if any
    entry_points: dict[str, int] = field(default_factory=dict)  # packed entry point of each function

    def prepare(self, name: str, example: Sequence) -> Callable[[Sequence, int], None]:
        """Function ``name`` for calls whose arguments are shaped like ``example``:
        ``call(args, threads)``, without TVM's Python FFI (backends/tvm/direct.py)."""
        return DirectCall(self.entry_points[name], example, self.functions[name], name)

    def export(self, path: Path) -> None:
        """Write the compiled code as a shared library."""
        if self.image is not None:
            Path(path).write_bytes(self.image)
        else:
            self.module.export_library(str(path))

    @property
    def tir(self) -> str:
        return "\n\n".join(p.script() for p in self.prims.values())

    def source(self, stage: str) -> str:
        if stage == "tir":
            return self.tir
        if stage in ("llvm", "ll", "asm"):
            # a module loaded from the cache or an AOT build carries no source: rebuild it here
            fresh = tvm.compile(tvm.IRModule(self.prims), target=host_target())
            return fresh.mod.inspect_source("asm" if stage == "asm" else "ll")
        raise BackendError(f"unknown stage '{stage}' for the cpu target (tir, llvm, asm)")


def build(funcs: list[L.LoopFunc], cache_dir: Path | None = None) -> Built:
    """Compile loop-IR functions (variants of one kernel) into one module for the host CPU,
    through the on-disk cache when ``cache_dir`` is given."""
    prims = {f.name: cpu_tir(f) for f in funcs}
    target = host_target()
    key = cache.key_of(*(p.script() for p in prims.values()), str(target), tvm.__version__)
    if cache_dir is not None:
        hit = cache.lookup(Path(cache_dir), key, lambda path: load(path, prims, path.read_bytes()), ".so")
        if hit is not None:
            return hit
    try:
        module = tvm.compile(tvm.IRModule(prims), target=target)
    except Exception as err:  # noqa: BLE001 - TVM raises its own internal error types
        raise BackendError(f"TVM could not compile kernel '{funcs[0].name}': {str(err).splitlines()[-1]}") from None
    with tempfile.TemporaryDirectory(prefix="sparsedsl-tvm-") as tmp:
        path = Path(tmp) / "kernels.so"
        module.export_library(str(path))
        if cache_dir is not None:
            cache.store(Path(cache_dir), key, lambda entry: shutil.copyfile(path, entry), ".so")
        return load(path, prims, path.read_bytes())


def cpu_tir(func: L.LoopFunc) -> tvm.tirx.PrimFunc:
    """The TIR of a loop-IR function for the CPU: its transposing copies in vector shuffles."""
    return to_tir(vector_transposes(func))


def load(path: Path, prims: dict[str, tvm.tirx.PrimFunc], image: bytes) -> Built:
    """The kernels ``prims`` from the library at ``path`` (whose bytes are ``image``), their
    parallel loops run on torch's OpenMP threads (backends/tvm/pool.py)."""
    module, library = load_module(path)
    functions = {name: pool.run_with_threads(module[name]) for name in prims}
    return Built(module, functions, prims, image, {name: entry_point(library, name) for name in prims})


def load_module(path: Path) -> tuple[tvm.runtime.Module, ctypes.CDLL]:
    """A compiled kernel library written by ``export_library``, its parallel loops on torch's
    OpenMP threads (TVM's own pool is never started), and its handle."""
    module = tvm.runtime.load_module(str(path))
    return module, pool.adopt(path)
