"""A linear layer fused with the residual add and the layer norm after it: BERT's
``dense -> dropout -> + residual -> LayerNorm`` (``BertSelfOutput``, ``BertOutput``) as one
row-wise kernel (``linear_bias_residual_layernorm`` of sparsedsl/nn.sdsl).

The residual is an argument of the layer's *parent*'s forward, not of the layer, so the parent is
replaced: ``ResidualNorm`` holds the parent's children under their own names (the state dict keeps
its keys) and computes ``norm(layer(x) + residual)`` from ``forward(x, residual)``.
``compile_model`` checks on a random input that the parent computes exactly that before it
replaces it (``fuse_residual_norm``)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from sparsedsl.runtime import ops
from sparsedsl.runtime.modules import SparseLinear
from sparsedsl.runtime.program import Program


def run_residual_norm(
    x: torch.Tensor,
    structure: list[torch.Tensor],
    values: torch.Tensor,
    shape: list[int],
    program: str,
    fmt: str,
    kernel: str,
    bias: torch.Tensor,
    residual: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """``kernel(x, W, bias, residual, gamma, beta, eps)`` of a registered program, ``x`` [..., K]."""
    w = ops.weight(program, fmt, shape, structure, values)
    return ops.apply_linear(ops.lookup(program), kernel, x, w, bias, residual, gamma, beta, eps)


# the op: the same function, traceable by torch.compile; no backward (training runs the parent's own forward)
linear_residual_norm = torch.library.custom_op("sparsedsl::linear_residual_norm", mutates_args=())(
    run_residual_norm
)


@linear_residual_norm.register_fake
def _(x, structure, values, shape, program, fmt, kernel, bias, residual, gamma, beta, eps):
    return x.new_empty(*x.shape[:-1], shape[0])


class ResidualNorm(nn.Module):
    """``norm(layer(x) + residual)`` by one kernel of ``program``, in place of ``parent`` (whose
    children it takes over); in training mode, or once the layer is no ``SparseLinear`` (replaced
    by its ``to_dense()``), the parent's own forward runs (its dropout, and gradients through the
    layer)."""

    def __init__(self, parent: nn.Module, layer: str, norm: str, program: Program, kernel: str):
        super().__init__()
        for name, child in parent.named_children():
            self.add_module(name, child)
        self.layer_name, self.norm_name, self.kernel = layer, norm, kernel
        self.key = ops.register(program)
        self.unfused = type(parent).forward
        self.replaced = type(parent).__name__
        self.train(parent.training)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        layer = getattr(self, self.layer_name)
        if self.training or not isinstance(layer, SparseLinear):  # or made dense again (to_dense)
            return self.unfused(self, x, residual)
        norm: nn.LayerNorm = getattr(self, self.norm_name)
        bias = layer.bias if layer.bias is not None else layer.values.new_zeros(layer.out_features)
        shape = [layer.out_features, layer.in_features]
        args = (x, layer.structure(), layer.values, shape, self.key, layer.format, self.kernel, bias, residual)
        args += (norm.weight, norm.bias, float(norm.eps))
        traced = torch.compiler.is_compiling() or torch.is_grad_enabled()
        return linear_residual_norm(*args) if traced else run_residual_norm(*args)

    def extra_repr(self) -> str:
        return f"replaces={self.replaced}, kernel={self.kernel}"


def fuse_residual_norm(parent: nn.Module, layer: str, norm: str, program: Program, kernel: str) -> ResidualNorm | str:
    """A ``ResidualNorm`` for ``parent`` (whose children ``layer``, a ``SparseLinear``, and ``norm``
    are named), or why not: ``norm`` is no ``nn.LayerNorm`` over the layer's outputs, or ``parent``
    does not compute ``norm(layer(x) + residual)`` from ``forward(x, residual)`` (checked on a
    random input, dropout off)."""
    sparse, module = getattr(parent, layer), getattr(parent, norm)
    if not isinstance(module, nn.LayerNorm) or tuple(module.normalized_shape) != (sparse.out_features,):
        return f"is {type(module).__name__}, not an nn.LayerNorm over the layer's {sparse.out_features} outputs"
    if not module.elementwise_affine or module.bias is None:
        return "is a LayerNorm without its weight and bias"
    fused = ResidualNorm(parent, layer, norm, program, kernel)
    reference = copy.deepcopy(parent).eval()  # with the layer's dense twin: nothing compiles but the kernel
    setattr(reference, layer, sparse.to_dense())
    gen = torch.Generator().manual_seed(0)
    dtype = sparse.values.dtype
    x = torch.randn(4, sparse.in_features, generator=gen).to(dtype)
    r = torch.randn(4, sparse.out_features, generator=gen).to(dtype)
    try:
        with torch.no_grad():
            want = reference(x, r)
            got = fused.eval()(x, r)
    except (TypeError, RuntimeError) as err:
        return f"sits in {type(parent).__name__}, whose forward(x, residual) fails: {err}"
    finally:
        fused.train(parent.training)
    if not (isinstance(want, torch.Tensor) and torch.allclose(got, want, rtol=1e-3, atol=1e-3)):
        return f"sits in {type(parent).__name__}, which does not compute norm(layer(x) + residual)"
    return fused
