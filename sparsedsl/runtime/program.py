"""Compiled programs: ``sd.compile(...)`` returns a Program whose kernels are torch callables."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from torch.autograd import profiler

from sparsedsl.cache import key_of
from sparsedsl.config import cache_dir as default_cache_dir
from sparsedsl.config import cache_path, num_threads
from sparsedsl.errors import ArgumentError, BackendError, PackError, ScheduleError, SdslError
from sparsedsl.frontend.check import Program as CheckedProgram
from sparsedsl.frontend.check import check
from sparsedsl.frontend.source import read_source
from sparsedsl.ir import kernel_ir as K
from sparsedsl.ir import levels as lv
from sparsedsl.ir import loop_ir as L
from sparsedsl.ir import schedule as sched
from sparsedsl.ir import variants
from sparsedsl.ir.buffer_names import stored_values
from sparsedsl.ir.formats import Format
from sparsedsl.ir.lowering import LowerOptions, lower
from sparsedsl.runtime import tuning
from sparsedsl.runtime.calls import BoundCall, BoundCalls, signature, threads_for
from sparsedsl.runtime.sparse_tensor import STAMP, SparseTensor
from sparsedsl.runtime.variant_builds import VariantBuilds

TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int32": torch.int32,
}
TARGETS = ("cpu", "cuda")
GPU_TILE = 128  # tokens per CUDA block (a warp of threads, up to 4 tokens each: ir/gpu.py)
TENSOR_TILE = 64  # tokens per warp on tensor cores (ir/tensor_cores.py)
BACKENDS = ("tvm", "llvm")


@dataclass
class Instance:
    """A kernel lowered and built for one format of its sparse input: one or more scheduled
    variants (same arguments), compiled into one module by ``backend``; ``pick`` chooses per call."""

    variants: dict[str, L.LoopFunc]
    built: object
    backend: str
    plans: list[tuple[str, str | None]] = field(default_factory=list)

    @property
    def code(self) -> str:
        """A digest of the variants' code and backend: what a measured choice between them is kept
        under (the same loop IR compiles to different code, and relative speeds, per backend)."""
        if "code" not in self.__dict__:
            self.__dict__["code"] = key_of(self.backend, *(L.func_str(v) for v in self.variants.values()))
        return self.__dict__["code"]

    @property
    def params(self) -> tuple:
        return next(iter(self.variants.values())).params

    @property
    def meta(self) -> dict:
        """What the lowering and the GPU mapping recorded about the compiled code."""
        return next(iter(self.variants.values())).meta

    @property
    def scratch(self) -> tuple[str, ...]:
        """Float32 work buffers the compiled code takes besides the arguments (shaped like the output)."""
        return self.meta.get("scratch", ())

    @property
    def transposed(self) -> tuple[str, ...]:
        """The arguments (and output) the compiled code takes transposed (GPU kernels: coalesced
        reads and writes)."""
        return self.meta.get("transposed", ())

    def plan(self, kernel: K.Kernel) -> list[tuple[str, str | None]]:
        """Where each argument of the compiled function comes from: ``("arg", name)`` a call
        argument, ``("size", name)`` a shape size, ``("sparse", key)`` a buffer of the sparse input,
        ``("out", None)`` the output, ``("transposed", name)`` a 2-D call argument transposed,
        ``("scratch", shape names)`` a float32 work buffer.
        Worked out once; calls only look it up."""
        if not self.plans:
            out = kernel.output.name
            dense = {p.name for p in kernel.inputs if not p.sparse}
            prefix = f"{kernel.sparse_input.name}_" if kernel.sparse_input else ""
            for p in self.params:
                if p.name in (out, stored_values(out)):
                    self.plans.append(("out", None))
                elif p.name in self.scratch:
                    self.plans.append(("scratch", tuple(d.name for d in p.shape)))
                elif p.name in self.transposed:
                    self.plans.append(("transposed", p.name))
                elif p.name in dense:
                    self.plans.append(("arg", p.name))
                elif isinstance(p, L.Var):
                    self.plans.append(("size", p.name))
                else:
                    self.plans.append(("sparse", p.name.removeprefix(prefix)))
        return self.plans

    def function_name(self, sizes: dict[str, int], threads: int) -> str:
        """The compiled variant for a call whose shape names have ``sizes``, on ``threads`` threads."""
        return self.variants[sched.pick(self.variants, sizes.get(self.meta.get("token_size")), threads)].name


@dataclass
class CompiledKernel:
    """A kernel of a program, callable on torch tensors; instantiated per sparse format."""

    program: Program
    kernel: K.Kernel
    instances: dict[tuple[Format | None, tuple[str, ...] | None], Instance] = field(default_factory=dict)
    bound: BoundCalls = field(default_factory=BoundCalls)

    @property
    def name(self) -> str:
        return self.kernel.name

    def signature(self) -> str:
        def one(p: K.TensorParam) -> str:
            shape = f"[{', '.join(p.shape)}]" if p.shape is not None else ""
            fmt = f" @ {p.pattern_of or (p.format.label if p.format else 'sparse')}" if p.sparse else ""
            return f"{p.name}: {p.dtype}{shape}{fmt}"

        return f"{self.name}({', '.join(one(p) for p in self.kernel.inputs)}) -> ({one(self.kernel.output)})"

    def lowered(self, fmt: Format | None, index_dtypes: tuple[str, ...] | None = None) -> dict[str, L.LoopFunc]:
        """The scheduled loop IR variants of this kernel for a format (its own when None) whose
        index buffers have types ``index_dtypes`` (format order; None: int32)."""
        kernel = self.kernel.with_format(fmt) if fmt is not None else self.kernel
        directives = self.program.schedule_directives(self.name)
        try:
            opts = replace(variants.lower_options(directives, kernel), index_dtypes=index_dtypes)
            if self.program.target == "cuda":
                return {"cuda": self._gpu(kernel, opts, directives)}
            from sparsedsl.backends.llvm.jit import vector_bits

            return variants.cpu(kernel, opts, directives, vector_bits())
        except SdslError as err:
            raise err.with_source(self.program.checked.source) from None

    def _gpu(self, kernel: K.Kernel, opts: LowerOptions, directives) -> L.LoopFunc:
        """The kernel mapped to a CUDA grid; ``bind`` and ``stage`` directives act after mapping."""
        from sparsedsl.ir import tensor_cores
        from sparsedsl.ir.gpu import check_vector_lanes, lane_loop, map_to_gpu
        from sparsedsl.ir.staging import stage_shared

        tensorize = next((d for d in directives if d.verb == "tensorize"), None)
        tile = opts.tile if any(d.verb == "tile" for d in directives) else TENSOR_TILE if tensorize else GPU_TILE
        func = lower(kernel, replace(opts, tile=tile, gpu=True))
        lanes = lane_loop(func)
        vector = next((d for d in directives if d.verb == "vectorize" and d.loops[0].text == lanes), None)
        if vector is not None:
            check_vector_lanes(func, vector.span)
        mapped = ("tile", "layout", "bind", "stage", "tensorize")
        loop_directives = [d for d in directives if d.verb not in mapped and d is not vector]
        func = sched.apply(func, loop_directives)
        if tensorize:
            after = next((d for d in directives if d.verb in ("bind", "stage") or d is vector), None)
            if after is not None:
                raise ScheduleError(
                    f"'{after.verb}' cannot follow 'tensorize', which maps the kernel itself", after.span
                )
            func = tensor_cores.tensorize(func, tensorize.span)
        else:
            func = map_to_gpu(func, kernel.output.name, vector_tokens=vector is not None)
        for d in directives:
            if d.verb == "bind":
                func = sched.set_kind(func, d.loops[0].text, L.LoopKind(d.target), d.span)
            elif d.verb == "stage":
                func = stage_shared(func, d.loops[0].text, d.loops[2].text, d.span)
        return func

    def instance(self, fmt: Format | None = None, index_dtypes: tuple[str, ...] | None = None) -> Instance:
        """The kernel built for a format (its own when None) whose index buffers have types
        ``index_dtypes`` (``index_types``; None: the widest its tensors can have, the one set every
        build of the format holds: int32 coordinates, a byte for a level of fixed small extent),
        built on first use."""
        fmt = fmt or (self.kernel.sparse_input.format if self.kernel.sparse_input else None)
        if fmt is not None and index_dtypes is None:
            index_dtypes = index_type_choices(fmt)[-1]
        key = (fmt, index_dtypes)
        if key not in self.instances and self.program.aot is not None:
            label = f"{fmt.label} with index types {', '.join(index_dtypes) or 'none'}" if fmt else "its dense form"
            raise BackendError(
                f"kernel '{self.name}' was not built ahead of time for {label} in "
                f"{self.program.aot}; add a model rule for it and rebuild"
            )
        if key not in self.instances:
            variants = self.lowered(fmt, index_dtypes)
            built = self.program.variant_builds(list(variants.values()))
            # where another thread made this instance meanwhile, its (calls may be prepared on it)
            return self.instances.setdefault(key, Instance(variants, built, self.program.backend))
        return self.instances[key]

    def instance_for(self, weight: SparseTensor | None) -> Instance:
        """The kernel built for calls with this sparse argument (its format and index types)."""
        if weight is None:
            return self.instance()
        return self.instance(weight.format, index_types(weight))

    def source(self, stage: str = "tir", format: str | Format | None = None) -> str:
        """Generated code: ``ir`` (loop IR), ``tir``, ``llvm`` (LLVM IR) or ``asm``."""
        fmt = self.program.format(format) if isinstance(format, str) else format
        if stage == "ir":
            return "\n\n".join(L.func_str(f) for f in self.lowered(fmt or self._default_format()).values())
        return self.instance(fmt).built.source(stage)

    def _default_format(self) -> Format | None:
        return self.kernel.sparse_input.format if self.kernel.sparse_input else None

    def __call__(self, *args):
        if self.program.target != "cpu":
            return self._call_mapped(args)
        threads = num_threads()
        key = signature(args, threads)
        call = self.bound.get(key)
        if call is None:
            call = self._bind_call(args, threads)
            self.bound.put(key, call)
        if profiler._is_profiler_enabled:  # torch.profiler shows each kernel call by its name
            with profiler.record_function(f"sparsedsl::{self.kernel.name}"):
                return call(args)
        return call(args)

    def _bind_call(self, args, threads: int) -> Callable[[tuple], object]:
        """Check ``args`` in full and bind a CPU call of their signature (runtime/calls.py): a
        ``BoundCall``, or ``_call_mapped`` for GPU-mapped code."""
        kernel = self.kernel
        call_args, sizes, sparse = _bind(kernel, args)
        inst = self.instance_for(sparse)
        if inst.transposed or inst.scratch or "padded" in inst.meta or inst.meta.get("tensor_cores"):
            return self._call_mapped  # GPU-mapped code: its arguments are transposed, padded or aligned per call
        work = sparse.nnz if sparse is not None else 1
        for dim, size in sizes.items():
            if sparse is None or dim not in kernel.sparse_input.shape:
                work *= size
        out = kernel.output
        out_dtype = TORCH_DTYPES[out.dtype]
        out_shape = None if out.pattern_of else tuple(sizes[d] for d in out.shape)
        if out_shape is None:  # the values of the sparse argument's pattern
            output = torch.empty_like(sparse.values, dtype=out_dtype)
        else:
            output = torch.empty(out_shape, dtype=out_dtype)
        sources = {"arg": call_args, "size": sizes, "sparse": sparse.buffers if sparse else {}, "out": {None: output}}
        example = [sources[kind][key] for kind, key in inst.plan(kernel)]
        used = threads_for(work, threads)
        return BoundCall.lay_out(
            self._chosen(inst, sizes, used, example, work),
            used,
            inst.plan(kernel),
            kernel,
            sizes,
            (out_shape, out_dtype),
            getattr(sparse.values, STAMP) if sparse is not None else None,
        )

    def _chosen(self, inst: Instance, sizes: dict[str, int], threads: int, example: list, work: int):
        """The variant for a call, prepared on ``example``: the measured fastest for its shape
        bucket (runtime/tuning.py), measured now if it never was; ``sched.pick``'s rule for small
        work or a single variant."""
        if len(inst.variants) == 1 or work < tuning.MEASURED_WORK or not tuning.enabled():
            return inst.built.prepare(inst.function_name(sizes, threads), example)
        choice = tuning.key(inst.code, sizes, inst.meta.get("token_size"), threads)
        names = [v.name for v in inst.variants.values()]
        name = self.program.choices.get(choice)
        if name in names:
            return inst.built.prepare(name, example)
        inst.built.require(names)  # the variants timed, compiled together
        prepared = {n: inst.built.prepare(n, example) for n in names}
        name = tuning.fastest({n: partial(run, example, threads) for n, run in prepared.items()})
        self.program.choices.put(choice, name)
        return prepared[name]

    def _call_mapped(self, args):
        """A call of a kernel mapped onto a GPU (or of GPU-mapped code run on the CPU, as the tests'
        emulation does): checked and laid out every time (the arguments are copied and
        transposed per call anyway)."""
        kernel = self.kernel
        device = "cuda" if self.program.target == "cuda" else "cpu"
        call_args, sizes, sparse = _bind(kernel, args, device)
        inst = self.instance_for(sparse)
        out = kernel.output
        if out.pattern_of:
            result = torch.empty_like(sparse.values, dtype=TORCH_DTYPES[out.dtype])
        else:
            shape = tuple(sizes[d] for d in out.shape)
            flipped = out.name in inst.transposed  # written [N, M] by the kernel, returned [M, N]
            result = torch.empty(shape[::-1] if flipped else shape, dtype=TORCH_DTYPES[out.dtype], device=device)
        buffers = sparse.buffers if sparse else {}
        rows = {}  # a transposed argument padded to whole token tiles: its row length
        for name, (tiles, dim, tile) in inst.meta.get("padded", {}).items():
            sizes[tiles] = -(-sizes[dim] // tile)
            rows[name] = sizes[tiles] * tile
        transposed = [name for name in inst.transposed if name in call_args]
        sources = {
            "arg": call_args,
            "transposed": {name: _transpose(call_args[name], rows.get(name)) for name in transposed},
            "size": sizes,
            "sparse": _aligned(buffers) if inst.meta.get("tensor_cores") else buffers,
        }
        sources["out"] = {None: result}

        def argument(kind: str, key):
            if kind == "scratch":  # a float32 work buffer of these sizes
                return torch.empty([sizes[d] for d in key], dtype=torch.float32, device=device)
            return sources[kind][key]

        flat = [_compact(argument(kind, key)) for kind, key in inst.plan(kernel)]
        inst.built.functions[inst.function_name(sizes, num_threads())](*flat)
        if out.pattern_of:
            return sparse.with_values(result)
        return result.t().contiguous() if out.name in inst.transposed else result


def index_types(weight) -> tuple[str, ...]:
    """The types of the index buffers of a sparse tensor (or a ``SparseLinear``: anything with
    ``structure()``), in format order: what its kernels are built for."""
    return tuple(lv.type_name(b.dtype) for b in weight.structure())


def index_type_choices(fmt: Format | None) -> list[tuple[str, ...] | None]:
    """Every set of index types a format's tensors can have, whatever their shape: what a build
    made before the shapes are known (AOT, a cache filled for another machine) compiles (None for
    a kernel without a sparse input)."""
    if fmt is None:
        return [None]
    return [tuple(lv.type_name(d) for d in choice) for choice in fmt.index_dtype_choices()]


def _compact(arg):
    """An empty tensor with compact strides: torch calls any empty tensor contiguous, whatever its
    strides (an empty column of a table), and the compiled code's argument check refuses those."""
    if isinstance(arg, torch.Tensor) and arg.numel() == 0:
        strides = [1] * arg.dim()
        for d in range(arg.dim() - 2, -1, -1):
            strides[d] = strides[d + 1] * arg.shape[d + 1]
        return torch.empty_strided(arg.shape, strides, dtype=arg.dtype, device=arg.device)
    return arg


def _transpose(t: torch.Tensor, rows: int | None) -> torch.Tensor:
    """A 2-D argument transposed, its rows padded with zeros to length ``rows`` if given (whole
    token tiles: ``gpu.transpose_operands``)."""
    if rows is None:
        return t.t().contiguous()
    out = t.new_zeros((t.shape[1], rows))
    out[:, : t.shape[0]] = t.t()
    return out


WMMA_ALIGN = 32  # bytes: tensor-core tiles load from 256-bit aligned addresses


def _aligned(buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The sparse buffers, copied where a view starts off the alignment tensor cores load from."""
    return {k: v if v.data_ptr() % WMMA_ALIGN == 0 else v.clone() for k, v in buffers.items()}


def _bind(kernel: K.Kernel, args, device: str = "cpu") -> tuple[dict, dict[str, int], SparseTensor | None]:
    """Check every argument against the signature (before anything runs) and bind shape names."""
    names = ", ".join(p.name for p in kernel.inputs)
    if len(args) != len(kernel.inputs):
        raise ArgumentError(f"kernel '{kernel.name}' takes {len(kernel.inputs)} arguments ({names}), got {len(args)}")
    sizes: dict[str, int] = {}
    origin: dict[str, str] = {}
    bound: dict[str, object] = {}
    sparse: SparseTensor | None = None

    def bind_shape(p: K.TensorParam, shape: tuple[int, ...]) -> None:
        if len(shape) != len(p.shape):
            raise ArgumentError(
                f"'{p.name}' must have {len(p.shape)} dimension{'s' * (len(p.shape) != 1)} "
                f"[{', '.join(p.shape)}], got shape {tuple(shape)}"
            )
        for dim, size in zip(p.shape, shape):
            if dim in sizes and sizes[dim] != size:
                raise ArgumentError(
                    f"'{origin[dim]}' and '{p.name}' disagree on {dim}: '{origin[dim]}' gives {dim} = {sizes[dim]}, "
                    f"'{p.name}' has shape {tuple(shape)} for [{', '.join(p.shape)}], so {dim} = {size}"
                )
            sizes.setdefault(dim, size)
            origin.setdefault(dim, p.name)

    for p, a in zip(kernel.inputs, args):
        want = TORCH_DTYPES[p.dtype]
        if p.shape is None:
            value = a.item() if isinstance(a, torch.Tensor) and a.numel() == 1 else a
            if not isinstance(value, int | float):
                raise ArgumentError(f"'{p.name}' is a scalar; got {type(value).__name__}")
            bound[p.name] = float(value)
            continue
        if p.sparse:
            if not isinstance(a, SparseTensor):
                raise ArgumentError(
                    f"'{p.name}' must be a sparse tensor (prog.pack(format, dense)); got {type(a).__name__}"
                )
            if a.dtype != want:
                raise ArgumentError(f"'{p.name}' must hold {p.dtype} values, got {a.dtype}")
            if any(b.device.type != device for b in a.buffers.values()):
                raise ArgumentError(
                    f"'{p.name}' is on {a.device}, but this kernel was compiled for {device} (W.to('{device}'))"
                )
            try:
                a.check()  # O(1) unless a buffer was replaced or written in place since it was checked
            except PackError as err:
                raise PackError(f"'{p.name}': {err.message}") from None
            bind_shape(p, a.shape)
            sparse = a
            continue
        if not isinstance(a, torch.Tensor):
            raise ArgumentError(f"'{p.name}' must be a torch.Tensor, got {type(a).__name__}")
        if a.dtype != want:
            raise ArgumentError(f"'{p.name}' must be {p.dtype}, got {a.dtype}")
        if a.device.type != device:
            raise ArgumentError(
                f"'{p.name}' is on {a.device}, but this kernel was compiled for {device} (.to('{device}'))"
            )
        if not a.is_contiguous():
            raise ArgumentError(f"'{p.name}' must be contiguous (call .contiguous() first)")
        bind_shape(p, tuple(a.shape))
        bound[p.name] = a.detach()
    for d in kernel.output.shape:
        if d not in sizes:
            raise ArgumentError(f"output size {d} is not given by any argument")
    return bound, sizes, sparse


class Program:
    """A compiled .sdsl file: ``prog.pack(...)``, ``prog.<kernel>(...)``, ``prog.kernels``."""

    def __init__(
        self,
        checked: CheckedProgram,
        target: str = "cpu",
        backend: str = "tvm",
        cache_dir: str | os.PathLike | None = None,
        arch: str | None = None,
    ):
        if target not in TARGETS:
            raise BackendError(f"unknown target '{target}' (known: {', '.join(TARGETS)})")
        if backend not in BACKENDS:
            raise BackendError(f"unknown backend '{backend}' (known: {', '.join(BACKENDS)})")
        if target == "cuda" and backend != "tvm":
            raise BackendError("the cuda target is built by the tvm backend")
        self.checked = checked
        self.target = target
        self.arch = arch  # CUDA architecture (sm_80, sm_90...); None: the visible GPU's, else sm_80
        self.backend = backend
        self.cache_dir = cache_path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._formats: dict[str, Format] = {}
        self._choices: tuning.Choices | None = None
        self.aot: Path | None = None  # the build directory of a program from ``sd.load``
        self.rules: list = []  # and its model rules (``sparsedsl.runtime.rules.Rule``)
        self.attention_rules: list = []  # and attention rules (``sparsedsl.runtime.rules.AttentionRule``)
        self.kernels = {name: CompiledKernel(self, k) for name, k in checked.kernels.items()}
        # ``prog.<kernel>`` as a plain attribute (through ``__getattr__`` it costs a failed lookup,
        # ~1 µs a call); a kernel named like a Program attribute stays in ``kernels`` only
        taken = set(vars(self)) | set(dir(Program))
        vars(self).update({name: k for name, k in self.kernels.items() if name not in taken})
        for name, kernel in self.kernels.items():
            if self.schedule_directives(name) and (kernel.kernel.sparse_input is None or kernel._default_format()):
                kernel.lowered(kernel._default_format())  # schedule errors surface at compile time

    @property
    def choices(self) -> tuning.Choices:
        """The measured variant choices (runtime/tuning.py), kept in the kernel cache directory."""
        if self._choices is None:
            from sparsedsl.backends.llvm.jit import host_cpu

            self._choices = tuning.Choices(tuning.choices_file(self.cache_dir, host_cpu()) if self.cache_dir else None)
        return self._choices

    def schedule_directives(self, kernel: str):
        decl = self.checked.schedules.get((kernel, self.target))
        return decl.directives if decl else ()

    def variant_builds(self, funcs: list[L.LoopFunc], whole=None):
        """A kernel's compiled variants: a CPU kernel's each compiled when a call first needs it
        (runtime/variant_builds.py), a CUDA kernel's one now; ``whole``: all of them already
        built (an ahead-of-time library)."""
        if self.target == "cuda":
            return whole if whole is not None else self.backend_build(funcs)
        return VariantBuilds(funcs, self.backend_build, whole)

    def backend_build(self, funcs: list[L.LoopFunc]):
        if self.target == "cuda":
            from sparsedsl.backends.cuda.build import build as cuda_build

            return cuda_build(funcs, self.arch, self.cache_dir)
        if self.backend == "llvm":
            from sparsedsl.backends.llvm.jit import build as llvm_build

            return llvm_build(funcs)
        from sparsedsl.backends.tvm.cpu import build

        return build(funcs, self.cache_dir)

    def format(self, text: str) -> Format:
        """A format from its text: ``"BSR(4, 1)"``."""
        if text not in self._formats:
            self._formats[text] = self.checked.parse_format(text)
        return self._formats[text]

    def pack(self, format: str | Format, dense: torch.Tensor) -> SparseTensor:
        """Store a dense tensor in a format of this program (prelude or user-defined)."""
        fmt = self.format(format) if isinstance(format, str) else format
        return SparseTensor.pack(fmt, dense)

    def __getattr__(self, name: str) -> CompiledKernel:
        kernels = self.__dict__.get("kernels", {})
        if name in kernels:
            return kernels[name]
        raise AttributeError(f"program has no kernel '{name}' (kernels: {', '.join(kernels) or 'none'})")

    def __dir__(self):
        return [*super().__dir__(), *self.kernels]


def compile(
    path_or_source: str | os.PathLike,
    target: str = "cpu",
    backend: str = "tvm",
    cache_dir: str | os.PathLike | None = None,
    arch: str | None = None,
) -> Program:
    """Check a .sdsl file (a path or the source text) and return its Program; kernels are built
    for the formats they are called with, the first time, through the kernel cache
    (``cache_dir``, default ``sparsedsl.config.cache_dir()``). ``target="cuda"`` builds CUDA
    kernels for ``arch`` (default: the visible GPU's, else sm_80)."""
    return Program(check(read_source(path_or_source)), target, backend, cache_dir, arch)
