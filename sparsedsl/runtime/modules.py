"""``SparseLinear``: a drop-in ``nn.Linear`` whose weight is stored in a sparse format."""

from __future__ import annotations

import torch
from torch import nn

from sparsedsl.errors import ArgumentError, PackError
from sparsedsl.ir import kernel_ir as K
from sparsedsl.runtime import ops
from sparsedsl.runtime.program import Program
from sparsedsl.runtime.prune import Gram, prune
from sparsedsl.runtime.sparse_tensor import SparseTensor

_LINEAR = K.KSum(("k",), K.KBin("*", K.KAccess("X", ("m", "k")), K.KAccess("W", ("n", "k"))))


def kept_weight(layer: nn.Module, values: torch.Tensor, structure: list[torch.Tensor]) -> SparseTensor:
    """A linear layer's ``[out_features, in_features]`` weight in its ``format`` as a SparseTensor
    of these tensors: the one the layer's op keeps on ``values`` while they are the same tensors
    (``ops.weight``; a module's ``load_state_dict`` or ``to`` replaces them, and the next call
    makes and checks a new one)."""
    shape = [layer.out_features, layer.in_features]
    return ops.weight(layer.key, layer.format, shape, structure, values)


def _is_linear(kernel: K.Kernel) -> tuple[bool, bool]:
    """(computes X W^T [+ b] exactly, takes a bias): only such kernels get gradients."""
    names = [p.name for p in kernel.inputs]
    if len(names) not in (2, 3) or kernel.indices != ("m", "n"):
        return False, len(names) == 3
    rename = {names[0]: "X", names[1]: "W"}
    value = kernel.value
    if len(names) == 3:
        if not (isinstance(value, K.KBin) and value.op == "+" and value.b == K.KAccess(names[2], ("n",))):
            return False, True
        value = value.a

    def norm(e):
        match e:
            case K.KAccess(t, idx):
                return K.KAccess(rename.get(t, t), idx)
            case K.KBin(op, a, b):
                return K.KBin(op, norm(a), norm(b))
            case K.KSum(idx, body):
                return K.KSum(idx, norm(body))
        return e

    return norm(value) == _LINEAR, len(names) == 3


def incoming_weight(layer: nn.Module, state_dict: dict, prefix: str, names: list[str]) -> SparseTensor | None:
    """The weight a state dict brings for a sparse layer (its structure buffers ``names``, then
    ``values``), validated against the layer's format and shape: a structure that does not fit is
    a PackError naming the layer. None when the dict does not hold all of them."""
    incoming = [state_dict.get(prefix + n) for n in (*names, "values")]
    if any(t is None for t in incoming):
        return None
    *structure, values = incoming
    try:
        fmt = layer.program.format(layer.format)
        return SparseTensor.from_structure(fmt, (layer.out_features, layer.in_features), structure, values)
    except PackError as err:
        raise PackError(f"state_dict of layer '{prefix.rstrip('.') or '(top)'}': {err.message}") from None


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` in a sparse format. The stored values are an ``nn.Parameter``
    (the pattern is fixed: sparse fine-tuning); the index structure is kept as buffers."""

    def __init__(
        self,
        weight: SparseTensor,
        bias: torch.Tensor | None = None,
        program: Program | None = None,
        kernel: str | None = None,
    ):
        super().__init__()
        self.key = ops.register(program if program is not None else ops.nn_program())
        self.format = weight.format.label
        self.out_features, self.in_features = weight.shape
        self.values = nn.Parameter(weight.values.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        for i, buf in enumerate(weight.structure()):
            self.register_buffer(f"structure_{i}", buf.clone())
        SparseTensor.from_structure(weight.format, weight.shape, self.structure(), self.values, validate=False)
        self.kernel = kernel or ("linear_bias" if bias is not None else "linear")
        compiled = self.program.kernels[self.kernel]
        differentiable, takes_bias = _is_linear(compiled.kernel)
        arity = len(compiled.kernel.inputs)
        if arity not in (2, 3) or (arity == 3 and bias is None):
            raise ArgumentError(
                f"kernel '{self.kernel}' takes {arity} inputs; a linear layer runs kernels of (X, W) or, "
                f"with a bias, (X, W, b)" + ("" if bias is not None else ": this layer has no bias")
            )
        self.kernel_takes_bias = takes_bias
        self.fused: nn.Module | None = None  # an activation the kernel's epilogue computes (compile_model)
        if differentiable:
            ops.mark_differentiable(self.key, self.kernel)

    @property
    def program(self) -> Program:
        """The program whose kernel this layer runs (held by key, so copies share it)."""
        return ops.lookup(self.key)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        format: str,
        sparsity: float | None = None,
        program: Program | None = None,
        kernel: str | None = None,
        method: str | None = None,
        inputs: torch.Tensor | Gram | None = None,
    ) -> SparseLinear:
        """Store ``linear``'s weight in ``format``, pruned by ``method`` (``sd.prune``; magnitude
        when only a sparsity is given) if either is given (otherwise it must already fit the format)."""
        program = program if program is not None else ops.nn_program()
        weight = linear.weight.detach()
        if sparsity is not None or method is not None:
            weight = prune(weight, program.format(format), sparsity, method=method or "magnitude", inputs=inputs)
        packed = program.pack(format, weight)
        return cls(packed, linear.bias, program, kernel)

    def structure(self) -> list[torch.Tensor]:
        buffers = self._buffers
        return [buffers[f"structure_{i}"] for i in range(len(buffers))]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        """Validate an incoming structure before taking it (a corrupted index is a PackError naming
        the layer, not a crash later); a structure of another pattern (another nnz) is taken too,
        and so is one of other integer widths (an int32 state dict from before narrow index
        buffers): it is stored in the types the format's levels choose."""
        names = [f"structure_{i}" for i in range(len(self._buffers))]
        weight = incoming_weight(self, state_dict, prefix, names)
        if weight is not None:
            values = weight.values
            for n, buf in zip(names, weight.structure()):
                if (getattr(self, n).shape, getattr(self, n).dtype) != (buf.shape, buf.dtype):
                    setattr(self, n, torch.empty_like(buf))
            if self.values.shape != values.shape:
                self.values = nn.Parameter(self.values.new_empty(values.shape))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def sparse_weight(self) -> SparseTensor:
        """The weight as a SparseTensor sharing this module's tensors; the same one while they are
        the same tensors (a call then finds its checks done: runtime/calls.py)."""
        return kept_weight(self, self._parameters["values"], list(self._buffers.values()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise ArgumentError(
                f"this SparseLinear takes inputs with {self.in_features} features in the last dimension, "
                f"got shape {tuple(x.shape)}"
            )
        bias = self._parameters.get("bias")  # not ``self.bias``: nn.Module's lookup costs ~1 µs a call
        fused_bias = bias if self.kernel_takes_bias else None
        if torch.compiler.is_compiling() or torch.is_grad_enabled():
            shape = [self.out_features, self.in_features]
            y = torch.ops.sparsedsl.linear(
                x, self.structure(), self.values, shape, self.key, self.format, self.kernel, fused_bias, None
            )
        else:  # outside autograd and tracing, skip the dispatcher: the op would run this same function
            y = ops.apply_linear(self.program, self.kernel, x, self.sparse_weight(), fused_bias, None)
        if bias is not None and not self.kernel_takes_bias:
            y = y + bias
        return y

    def to_dense(self) -> nn.Module:
        """An ``nn.Linear`` with the same (pruned) weight and bias, followed by the activation the
        kernel fuses, if any: the same function, densely."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.sparse_weight().to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear = linear.to(device=self.values.device, dtype=self.values.dtype)
        return nn.Sequential(linear, self.fused) if self.fused is not None else linear

    @property
    def density(self) -> float:
        return self.values.numel() / (self.out_features * self.in_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
            f"density={self.density:.3f}, bias={self.bias is not None}"
        )
