"""JIT-compile loop IR through llvmlite's MCJIT for the host CPU; object files for AOT builds."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import llvmlite.binding as llvm

from sparsedsl.backends import host
from sparsedsl.backends.llvm.codegen import TYPES, generate, parallel_on_top, size_names
from sparsedsl.errors import BackendError
from sparsedsl.ir import dot_products
from sparsedsl.ir import loop_ir as L

_CTYPES = {"float32": ctypes.c_float, "float64": ctypes.c_double, "int32": ctypes.c_int32, "int64": ctypes.c_int64}


@cache
def _initialize() -> None:
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    llvm.load_library_permanently(ctypes.util.find_library("m"))


def _machine() -> llvm.TargetMachine:
    """A new target machine for this CPU (an MCJIT engine owns, and frees, the one it is given)."""
    _initialize()
    target = llvm.Target.from_default_triple()
    return target.create_target_machine(
        cpu=llvm.get_host_cpu_name(),
        features=llvm.get_host_cpu_features().flatten(),
        opt=3,
        reloc="pic",
        codemodel="default",
    )


def host_cpu() -> str:
    _initialize()
    return llvm.get_host_cpu_name()


def code_features() -> list[str]:
    """The instruction-set extensions that code built here may use: every one this CPU has."""
    return host.used_in_code(host.present())


def vector_bits() -> int:
    """The widest vector register of this CPU: 512 with AVX-512, 256 with AVX2, else 128."""
    features = llvm.get_host_cpu_features()
    if features.get("avx512f"):
        return 512
    return 256 if features.get("avx2") else 128


@dataclass
class Kernel:
    """A JIT-compiled function with the calling convention of ``codegen``; ``owner`` holds its code
    (the engine, or the loaded library), kept alive by every call prepared on it."""

    func: L.LoopFunc
    address: int
    owner: object = None

    def __post_init__(self):
        argtypes = [ctypes.c_void_p if isinstance(p, L.Buffer) else _CTYPES[p.dtype] for p in self.func.params]
        self.sizes = size_names(self.func)
        argtypes += [ctypes.c_int64] * (len(self.sizes) + 1)
        self.cfunc = ctypes.CFUNCTYPE(None, *argtypes)(self.address)
        self.parallel = parallel_on_top(self.func)

    def prepare(self, example: Sequence) -> Callable[[Sequence, int], None]:
        """This function for calls whose arguments are shaped like ``example``: ``call(args,
        threads)``, the size arguments worked out once."""
        buffers = [isinstance(p, L.Buffer) for p in self.func.params]
        values: dict[str, int] = {}
        for p, a in zip(self.func.params, example):
            if isinstance(p, L.Buffer):
                values |= {dim.name: int(n) for dim, n in zip(p.shape, a.shape) if isinstance(dim, L.SizeVar)}
            else:
                values[p.name] = a
        sizes = [values[n] for n in self.sizes]
        # one parallel loop on top: no more threads than its iterations; a serial body forks each
        # parallel loop in it (staging, rows, write-out) on the call's threads
        most = self._iterations(values) if self.parallel else None
        cfunc, owner = self.cfunc, self.owner

        def call(args: Sequence, threads: int, owner=owner) -> None:  # the code lives while the call does
            cargs = [a.data_ptr() if buffer else a for a, buffer in zip(args, buffers)]
            cfunc(*cargs, *sizes, threads if most is None else min(threads, most))

        return call

    def _iterations(self, values: dict[str, int]) -> int:
        """How many iterations the outermost parallel loop has for these sizes."""
        return max(1, int(_evaluate(self.func.body.extent, values)))


def _evaluate(e: L.Expr, values: dict[str, int]) -> int:
    match e:
        case L.Const(v):
            return int(v)
        case L.SizeVar(n) | L.Var(n):
            return values[n]
        case L.Bin(op, a, b):
            x, y = _evaluate(a, values), _evaluate(b, values)
            return {"+": x + y, "-": x - y, "*": x * y, "//": x // y, "%": x % y, "min": min(x, y), "max": max(x, y)}[
                op
            ]
    return 1 << 30  # data-dependent: split across every thread


@dataclass
class Built:
    """Compiled variants of one kernel (same interface as the TVM backend's ``Built``)."""

    functions: dict[str, Kernel]
    llvm_ir: str
    engine: object
    library: Path | None = None

    def prepare(self, name: str, example: Sequence) -> Callable[[Sequence, int], None]:
        """Function ``name`` for calls whose arguments are shaped like ``example`` (``Kernel.prepare``)."""
        return self.functions[name].prepare(example)

    def source(self, stage: str) -> str:
        if stage in ("llvm", "ll"):
            return self.llvm_ir
        if stage == "asm":
            return _machine().emit_assembly(_optimized(self.llvm_ir))  # the code that runs
        raise BackendError(f"the llvm backend emits 'llvm' and 'asm', not '{stage}'")

    def export(self, path: Path) -> None:
        """A shared library of these kernels (object file linked by the system C compiler)."""
        if self.library is not None:
            Path(path).write_bytes(self.library.read_bytes())
            return
        obj = _machine().emit_object(_optimized(self.llvm_ir))
        with tempfile.TemporaryDirectory() as tmp:
            o = Path(tmp) / "kernels.o"
            o.write_bytes(obj)
            cc = os.environ.get("CC", "cc")
            result = subprocess.run(
                [cc, "-shared", "-o", str(path), str(o), "-lm"], capture_output=True, text=True, check=False
            )
            if result.returncode:
                raise BackendError(f"linking the kernels failed: {result.stderr.strip()}")


def _optimized(text: str) -> llvm.ModuleRef:
    mod = llvm.parse_assembly(text)
    mod.verify()
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    # The loops that should be vector code are vector code already (the schedule's vectorized
    # loops, emitted as vector operations). LLVM's loop vectorizer is off: on AMD Zen 4/5 cost
    # models, llvmlite's LLVM (built with assertions) aborts the process in it on some loops
    # ("VPlan cost model and legacy cost model disagreed"), e.g. a block-attention kernel.
    pto.loop_vectorization = False
    pto.slp_vectorization = True
    pb = llvm.create_pass_builder(_machine(), pto)
    pb.getModulePassManager().run(mod, pb)
    return mod


def optimized_engine(text: str) -> llvm.ExecutionEngine:
    """An MCJIT engine with the LLVM IR ``text`` optimised, compiled for this CPU and linked."""
    mod = _optimized(text)
    engine = llvm.create_mcjit_compiler(mod, _machine())
    engine.finalize_object()
    return engine


def build(funcs: list[L.LoopFunc]) -> Built:
    """Generate, optimise and JIT the functions; int8 and bf16 block products on this CPU's
    dot-product instructions (``ir/dot_products.py``)."""
    features = host.present()
    funcs = [dot_products.rewrite(f, host.dot_group(features)) for f in funcs]
    if host.bf16_dot(features):  # else the f32 FMAs on widened values, unrewritten
        funcs = [dot_products.rewrite(f, dot_products.BF16_GROUP, "bf16") for f in funcs]
    text = str(generate(funcs, vector_bits(), llvm.get_process_triple(), features))
    try:
        engine = optimized_engine(text)
    except RuntimeError as err:
        raise BackendError(f"LLVM rejected kernel '{funcs[0].name}': {err}") from None
    functions = {f.name: Kernel(f, engine.get_function_address(f.name), engine) for f in funcs}
    return Built(functions, text, engine)


def load_library(path: Path, funcs: list[L.LoopFunc]) -> Built:
    """Kernels from a shared library written by ``Built.export``."""
    lib = ctypes.CDLL(str(path))
    functions = {f.name: Kernel(f, ctypes.cast(getattr(lib, f.name), ctypes.c_void_p).value, lib) for f in funcs}
    return Built(functions, "", lib, Path(path))


__all__ = ["TYPES", "Built", "build", "code_features", "host_cpu", "load_library", "optimized_engine", "vector_bits"]
