"""Compiled CUDA kernels as plain data: the CUDA C, the cubin, and per loop function how to launch
it (the entry point, its parameters in order, grid and block sizes as expressions over the sizes).
It serialises to one JSON file (cache entries and AOT builds) and runs through the CUDA driver, so
neither TVM nor a compiler is needed where the kernels run."""

from __future__ import annotations

import base64
import ctypes
import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from sparsedsl.errors import BackendError
from sparsedsl.ir import loop_ir as L

FORMAT_VERSION = 2
DEFAULT_ARCH = "sm_80"

_SIGNATURE = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(([^)]*)\)')
_OPS = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "//": lambda a, b: a // b,
    "%": lambda a, b: a % b,
    "min": min,
    "max": max,
}
_SCALARS = {
    "int64_t": ctypes.c_int64,
    "int": ctypes.c_int32,
    "float": ctypes.c_float,
    "double": ctypes.c_double,
}


def default_arch() -> str:
    """``SPARSEDSL_CUDA_ARCH`` (to build for another machine), else the visible GPU's, else sm_80."""
    if os.environ.get("SPARSEDSL_CUDA_ARCH"):
        return os.environ["SPARSEDSL_CUDA_ARCH"]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"sm_{major}{minor}"
    return DEFAULT_ARCH


def size_expr(e: L.Expr) -> list:
    """A launch size as JSON: ``["c", 4]``, ``["v", "M"]`` or ``[op, a, b]``."""
    match e:
        case L.Const(value):
            return ["c", int(value)]
        case L.SizeVar(name) | L.Var(name):
            return ["v", name]
        case L.Bin(op, a, b) if op in _OPS:
            return [op, size_expr(a), size_expr(b)]
    raise BackendError(f"a GPU launch size must be computed from the shapes alone, not '{L.expr_str(e)}'")


def _evaluate(e: list, sizes: dict[str, int]) -> int:
    op, *args = e
    if op == "c":
        return args[0]
    if op == "v":
        return sizes[args[0]]
    return _OPS[op](_evaluate(args[0], sizes), _evaluate(args[1], sizes))


def _size_sources(func: L.LoopFunc) -> dict[str, tuple[int, int]]:
    """Where each size can be read at call time: ``(parameter index, dimension)``; dimension -1
    means the parameter is the size itself."""
    sources: dict[str, tuple[int, int]] = {}
    for i, p in enumerate(func.params):
        if isinstance(p, L.Buffer):
            for d, extent in enumerate(p.shape):
                if isinstance(extent, L.SizeVar | L.Var):
                    sources.setdefault(extent.name, (i, d))
        else:
            sources[p.name] = (i, -1)
    return sources


def _names(e: list) -> set[str]:
    op, *args = e
    if op == "c":
        return set()
    if op == "v":
        return {args[0]}
    return _names(args[0]) | _names(args[1])


@dataclass(frozen=True)
class Launch:
    """How to launch one kernel. ``params``: per CUDA parameter ``(C type or "ptr", index of the
    loop function's parameter, dimension)``, the dimension >= 0 when the value is that dimension
    of a tensor argument; ``sizes``: the sizes the grid and block expressions use, likewise."""

    entry: str
    params: tuple[tuple[str, int, int], ...]
    grid: tuple[list, ...]
    block: tuple[list, ...]
    sizes: tuple[tuple[str, int, int], ...]

    @staticmethod
    def all_of(func: L.LoopFunc, source: str, kernels: list[dict[L.LoopKind, L.Expr]]) -> tuple[Launch, ...]:
        """The launches of ``func``'s kernels, in order, read off the generated source's signatures
        (TVM names them ``<func>_kernel``, ``<func>_kernel_1``...); ``kernels``: their sizes."""
        named = re.compile(rf"{re.escape(func.name)}_kernel(?:_(\d+))?")
        found = {name: args for name, args in _SIGNATURE.findall(source) if named.fullmatch(name)}
        if len(found) != len(kernels):
            raise BackendError(f"'{func.name}' should become {len(kernels)} CUDA kernel(s), TVM made {len(found)}")
        entries = sorted(found, key=lambda name: int(named.fullmatch(name).group(1) or 0))
        return tuple(Launch.of(func, entry, found[entry], dims) for entry, dims in zip(entries, kernels))

    @staticmethod
    def of(func: L.LoopFunc, entry: str, args: str, dims: dict[L.LoopKind, L.Expr]) -> Launch:
        """The launch of ``func``'s kernel ``entry`` with C parameter list ``args``."""
        index = {p.name: i for i, p in enumerate(func.params)}
        sources = _size_sources(func)
        params = []
        for arg in (a.strip() for a in args.split(",")):
            ctype, name = arg.rsplit(" ", 1)
            if "*" in ctype and name.removesuffix("_ptr") in index:
                params.append(("ptr", index[name.removesuffix("_ptr")], -1))
            elif name in sources:
                params.append((ctype, *sources[name]))
            else:
                raise BackendError(f"CUDA kernel '{entry}' takes '{name}', which '{func.name}' does not provide")
        one = L.const(1)
        grid = tuple(size_expr(dims.get(k, one)) for k in (L.LoopKind.BLOCK_X, L.LoopKind.BLOCK_Y, None))
        block = tuple(size_expr(dims.get(k, one)) for k in (L.LoopKind.THREAD_X, None, None))
        used = sorted(set().union(*(_names(d) for d in grid + block)))
        missing = [n for n in used if n not in sources]
        if missing:
            raise BackendError(f"the launch of '{func.name}' needs {', '.join(missing)}, which no argument gives")
        return Launch(entry, tuple(params), grid, block, tuple((n, *sources[n]) for n in used))

    def dims(self, args) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """Grid and block sizes for a call with ``args``."""
        values = {name: _value(args, i, d) for name, i, d in self.sizes}
        grid = tuple(max(_evaluate(e, values), 0) for e in self.grid)
        return grid, tuple(_evaluate(e, values) for e in self.block)


def _value(args, i: int, d: int):
    return args[i] if d < 0 else args[i].shape[d]


def _ctype(kind: str, value):
    """A ctypes value of a kernel parameter of C type ``kind``."""
    if kind == "ptr":
        return ctypes.c_void_p(value.data_ptr())
    if kind not in _SCALARS:
        raise BackendError(f"CUDA parameters of type '{kind}' are not supported")
    return _SCALARS[kind](value)


@dataclass
class KernelFunction:
    """A loop function's kernels, launched in turn by one call with the loop function's arguments
    (tensors on the GPU, sizes and scalars as Python numbers)."""

    module: CudaModule
    launches: tuple[Launch, ...]

    def __call__(self, *args) -> None:
        from sparsedsl.backends.cuda.driver import launch

        device = next(a for a in args if isinstance(a, torch.Tensor)).device.index or 0
        for la in self.launches:
            grid, block = la.dims(args)
            if 0 in grid:
                continue
            fn = self.module.loaded(device).function(la.entry)
            values = [_ctype(kind, args[i] if kind == "ptr" else _value(args, i, d)) for kind, i, d in la.params]
            launch(fn, grid, block, values)


@dataclass
class CudaModule:
    """The compiled kernels of one (kernel, format): see the module docstring."""

    arch: str
    source_text: str
    cubin: bytes
    launches: dict[str, tuple[Launch, ...]]
    tir: str = ""
    _loaded: dict = field(default_factory=dict, repr=False)

    @cached_property
    def functions(self) -> dict[str, KernelFunction]:
        """The launchable kernels by loop function name (made once: calls look them up)."""
        return {name: KernelFunction(self, launches) for name, launches in self.launches.items()}

    def loaded(self, device: int):
        from sparsedsl.backends.cuda.driver import LoadedModule

        if device not in self._loaded:
            self._loaded[device] = LoadedModule(self.cubin, device)
        return self._loaded[device]

    def source(self, stage: str) -> str:
        if stage == "cuda":
            return self.source_text
        if stage == "tir" and self.tir:
            return self.tir
        raise BackendError(f"the cuda target emits 'tir' and 'cuda', not '{stage}'")

    def export(self, path: Path) -> None:
        data = {
            "format_version": FORMAT_VERSION,
            "arch": self.arch,
            "source": self.source_text,
            "cubin": base64.b64encode(self.cubin).decode(),
            "launches": {
                n: [[la.entry, la.params, la.grid, la.block, la.sizes] for la in launches]
                for n, launches in self.launches.items()
            },
            "tir": self.tir,
        }
        Path(path).write_text(json.dumps(data))

    @staticmethod
    def load(path: Path) -> CudaModule:
        data = json.loads(Path(path).read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise BackendError(f"{path}: CUDA module format {data.get('format_version')}, expected {FORMAT_VERSION}")
        launches = {
            name: tuple(
                Launch(entry, tuple(map(tuple, params)), tuple(grid), tuple(block), tuple(map(tuple, sizes)))
                for entry, params, grid, block, sizes in kernels
            )
            for name, kernels in data["launches"].items()
        }
        return CudaModule(data["arch"], data["source"], base64.b64decode(data["cubin"]), launches, data["tir"])
