"""``torch.library`` custom ops over compiled kernels: traceable by ``torch.compile`` (fake
implementations), differentiable (autograd through the transposed-product kernel for the input;
the values' gradient is the dense ``grad^T x`` by torch, read at the stored positions).

A custom op can only take tensors, numbers and strings, so compiled programs are registered here
under a string key and the op finds its kernel by that key. This registry is the one piece of
process-wide state of the runtime, and exists only because torch's op schemas demand it.
"""

from __future__ import annotations

import operator
import uuid
from functools import cache
from importlib import resources

import torch

from sparsedsl.errors import Source
from sparsedsl.frontend.check import check
from sparsedsl.ir.formats import Format
from sparsedsl.runtime.program import Program
from sparsedsl.runtime.sparse_tensor import SparseTensor, Transient, stamp, unchanged

_PROGRAMS: dict[str, Program] = {}
_DIFFERENTIABLE: set[tuple[str, str]] = set()  # (program key, kernel) computing exactly x W^T [+ b]


def register(program: Program) -> str:
    """Make a program reachable from the custom ops; returns its key."""
    key = getattr(program, "op_key", None)
    if key is None:
        key = uuid.uuid4().hex
        program.op_key = key
        _PROGRAMS[key] = program
    return key


def lookup(key: str) -> Program:
    """The program registered under ``key``."""
    return _PROGRAMS[key]


def mark_differentiable(key: str, kernel: str) -> None:
    """Declare that ``kernel`` of program ``key`` computes x W^T [+ b] (so the gradient kernels apply)."""
    _DIFFERENTIABLE.add((key, kernel))


@cache
def _nn_source() -> str:
    return resources.files("sparsedsl").joinpath("nn.sdsl").read_text()


def nn_program(formats_of: Program | None = None, target: str = "cpu", backend: str | None = None) -> Program:
    """The program of sparsedsl/nn.sdsl (linear layers and their gradients), knowing the formats of
    another program too (and using its backend). Cached per program it borrows formats from."""
    backend = backend or (formats_of.backend if formats_of is not None else "tvm")
    target = formats_of.target if formats_of is not None else target
    owner = formats_of if formats_of is not None else _default_owner(target, backend)
    nn = getattr(owner, "_nn_program", None)
    if nn is None:
        formats = owner.checked.formats if formats_of is not None else None
        arch = formats_of.arch if formats_of is not None else None
        nn = Program(check(Source(_nn_source(), "<sparsedsl/nn.sdsl>"), formats), target, backend, arch=arch)
        owner._nn_program = nn
        register(nn)
    return nn


@cache
def _default_owner(target: str, backend: str) -> Program:
    return Program(check(Source("", "<none>")), target, backend)


_WEIGHT = "_sparsedsl_op_weight"  # the attribute of a values tensor holding the op's last weight of it


def weight(key: str, fmt: str, shape: list[int], structure: list[torch.Tensor], values: torch.Tensor) -> SparseTensor:
    """The weight an op's arguments (or a layer's tensors) describe, in a format of the registered
    program ``key``: the one made for the same arguments last time, while they are the same
    tensors (a compiled model's op gets its module's tensors at every call; making it anew cost
    ~10 µs a call, and the kernel call still checks the structure's stamp)."""
    described = (key, fmt, tuple(shape))
    kept = getattr(values, _WEIGHT, None)
    same = kept is not None and kept[0] == described and len(kept[2]) == len(structure)
    if same and all(map(operator.is_, structure, kept[2])):
        return kept[1]
    made = SparseTensor.from_structure(_PROGRAMS[key].format(fmt), described[2], structure, values)
    setattr(values, _WEIGHT, Transient((described, made, tuple(structure))))
    return made


def run_linear(
    x: torch.Tensor,
    structure: list[torch.Tensor],
    values: torch.Tensor,
    shape: list[int],
    program: str,
    fmt: str,
    kernel: str,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """``kernel(x, W[, bias][, residual])`` of a registered program, ``x`` of shape [..., K]."""
    return apply_linear(_PROGRAMS[program], kernel, x, weight(program, fmt, shape, structure, values), bias, residual)


def apply_linear(
    program: Program,
    kernel: str,
    x: torch.Tensor,
    w: SparseTensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    *rest,
) -> torch.Tensor:
    """``kernel(x, w[, bias][, residual], *rest)`` of ``program``, ``x`` of shape [..., K]: the
    ops' body, which a module outside autograd and tracing calls directly."""
    rows = w.shape[0]
    flat = x.dim() == 2
    args = [(x if flat else x.reshape(-1, x.shape[-1])).contiguous(), w]
    if bias is not None:
        args.append(bias)
    if residual is not None:
        args.append(residual.reshape(-1, rows).contiguous())
    out = program.kernels[kernel](*args, *rest)
    return out if flat else out.reshape(*x.shape[:-1], rows)


# the op: the same function, traceable (fake below) and differentiable (autograd at the end)
linear = torch.library.custom_op("sparsedsl::linear", mutates_args=())(run_linear)


@linear.register_fake
def _(x, structure, values, shape, program, fmt, kernel, bias, residual):
    return x.new_empty(*x.shape[:-1], shape[0])


@torch.library.custom_op("sparsedsl::linear_grad_input", mutates_args=())
def linear_grad_input(
    grad: torch.Tensor, structure: list[torch.Tensor], values: torch.Tensor, shape: list[int], program: str, fmt: str
) -> torch.Tensor:
    """dL/dx = grad @ W, through the transposed-product kernel."""
    w = weight(program, fmt, shape, structure, values)
    nn = nn_program(_PROGRAMS[program])
    g2 = grad.reshape(-1, shape[0]).contiguous()
    return nn.linear_grad_input(g2, w).reshape(*grad.shape[:-1], shape[1])


@linear_grad_input.register_fake
def _(grad, structure, values, shape, program, fmt):
    return grad.new_empty(*grad.shape[:-1], shape[1])


POSITIONS = "_sparsedsl_positions"  # the attribute of a first index buffer caching stored_positions


def stored_positions(fmt: Format, shape: list[int], structure: list[torch.Tensor]) -> torch.Tensor:
    """The row-major index in the dense [N, K] weight of every stored position, in storage order
    (padded slots included: each is a stored value at its coordinate). Cached on the first index
    buffer, keyed like the validation stamp of sparse_tensor.py (each buffer's identity and
    in-place version), so it is computed once per structure."""
    named = dict(zip(fmt.buffer_keys(), structure))
    cached = getattr(structure[0], POSITIONS, None) if structure else None
    if cached is not None and unchanged(cached[0], fmt, tuple(shape), named):
        return cached[1]
    row, col = fmt.indices(named, tuple(shape))
    positions = (row * shape[1] + col).to(structure[0].device if structure else "cpu")
    if structure:
        setattr(structure[0], POSITIONS, Transient((stamp(fmt, tuple(shape), named), positions)))
    return positions


@torch.library.custom_op("sparsedsl::linear_grad_weight", mutates_args=())
def linear_grad_weight(
    grad: torch.Tensor,
    x: torch.Tensor,
    structure: list[torch.Tensor],
    values: torch.Tensor,
    shape: list[int],
    program: str,
    fmt: str,
) -> torch.Tensor:
    """dL/dvalues: (grad^T x) at the stored positions of W. A dense product by torch (oneDNN,
    cuBLAS) then a gather: at MiniLM shapes 1.7 to 32 times faster than a sparse SDDMM kernel
    on the CPU (docs/BENCHMARKS.md, "Distillation")."""
    positions = stored_positions(_PROGRAMS[program].format(fmt), shape, structure)
    g2 = grad.reshape(-1, shape[0])
    x2 = x.reshape(-1, shape[1])
    return (g2.t() @ x2).reshape(-1)[positions].to(values.dtype)


@linear_grad_weight.register_fake
def _(grad, x, structure, values, shape, program, fmt):
    return values.new_empty(values.shape)


def _setup(ctx, inputs, output):
    x, structure, values, shape, program, fmt, kernel, bias, residual = inputs
    # which inputs want a gradient, read from the tensors: ctx.needs_input_grad here counts the
    # structure list's tensors one by one, so its indices are not those of the inputs
    wanted = tuple(isinstance(t, torch.Tensor) and t.requires_grad for t in (x, values, bias, residual))
    ctx.save_for_backward(x, values, *structure)
    ctx.meta = (shape, program, fmt, kernel, wanted)


def _backward(ctx, grad):
    x, values, *structure = ctx.saved_tensors
    shape, program, fmt, kernel, (want_x, want_values, want_bias, want_residual) = ctx.meta
    if (program, kernel) not in _DIFFERENTIABLE:
        raise RuntimeError(
            f"sparsedsl kernel '{kernel}' is not a plain linear layer (x W^T + b), so it has "
            "no gradient; train with the unfused kernel"
        )
    grad = grad.contiguous()
    dx = linear_grad_input(grad, structure, values, shape, program, fmt) if want_x else None
    dv = linear_grad_weight(grad, x, structure, values, shape, program, fmt) if want_values else None
    db = grad.reshape(-1, shape[0]).sum(0) if want_bias else None
    dr = grad if want_residual else None
    # one gradient per input, a list of them for the list of structure tensors (no defaults in the
    # schema: torch drops arguments equal to their default before matching this structure)
    grads = (dx, [None] * len(structure), dv, None, None, None, None, db, dr)
    return grads


torch.library.register_autograd("sparsedsl::linear", _backward, setup_context=_setup)
