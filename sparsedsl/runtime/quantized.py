"""``QuantizedSparseLinear``: a sparse linear layer whose stored values are int8 (one f32 scale per
output channel, activations quantized per token when called) or bf16, for inference.

int8: ``y = (sum_k xq[m, k] wq[n, k]) * sx[m] * sw[n] + b[n]``, the sum exact in int32 and the
dequantization and bias in the kernel's epilogue (``nn.sdsl``'s ``qlinear_bias``). The
weight is quantized symmetrically per output row (``sw = max |w[n, :]| / 127``), the activations
per token (``sx = max |x[m, :]| / 127``) when the layer is called (dynamic quantization).
bf16: values and activations in bf16, products summed in f32 (``blinear_bias``).
"""

from __future__ import annotations

import torch
from torch import nn

from sparsedsl.errors import ArgumentError, PackError
from sparsedsl.frontend.check import QUANTIZED_DTYPES
from sparsedsl.runtime import ops
from sparsedsl.runtime.modules import SparseLinear, incoming_weight
from sparsedsl.runtime.program import Program
from sparsedsl.runtime.prune import Gram, prune
from sparsedsl.runtime.sparse_tensor import SparseTensor

QMAX = 127  # symmetric int8: -127..127, so that -x is representable for every x
KERNELS = {"int8": "qlinear_bias", "bf16": "blinear_bias"}  # nn.sdsl's, per dtype


class QuantizedSparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` sparse and stored as int8 values and per-output-channel scales
    (``dtype="int8"``) or bf16 values (``dtype="bf16"``). Inference only: the values are buffers,
    not parameters. ``state_dict`` holds the values in their dtype, the scales, the bias and the
    structure."""

    def __init__(
        self,
        weight: SparseTensor,
        dtype: str,
        bias: torch.Tensor | None = None,
        program: Program | None = None,
    ):
        super().__init__()
        if dtype not in QUANTIZED_DTYPES:
            raise ArgumentError(f"quantized layers are {' or '.join(QUANTIZED_DTYPES)}, not {dtype!r}")
        self.key = ops.register(program if program is not None else ops.nn_program())
        self.dtype_name = dtype
        self.format = weight.format.label
        self.out_features, self.in_features = weight.shape
        values = weight.values.detach().float()
        if dtype == "int8":
            rows = _rows_of(weight)
            scale = _row_scales(values, rows, self.out_features)
            stored = torch.round(values / scale[rows]).clamp_(-QMAX, QMAX).to(torch.int8)
        else:
            scale, stored = torch.ones(self.out_features), values.bfloat16()
        self.register_buffer("values", stored.contiguous())
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", torch.zeros(self.out_features) if bias is None else bias.detach().float().clone())
        for i, buf in enumerate(weight.structure()):
            self.register_buffer(f"structure_{i}", buf.clone())

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        format: str,
        dtype: str,
        sparsity: float | None = None,
        program: Program | None = None,
        method: str | None = None,
        inputs: torch.Tensor | Gram | None = None,
    ) -> QuantizedSparseLinear:
        """``linear`` pruned (as ``SparseLinear.from_linear``) and stored as ``dtype``."""
        program = program if program is not None else ops.nn_program()
        weight = linear.weight.detach().float()
        if sparsity is not None or method is not None:
            weight = prune(weight, program.format(format), sparsity, method=method or "magnitude", inputs=inputs)
        return cls(program.pack(format, weight), dtype, linear.bias, program)

    @property
    def program(self) -> Program:
        return ops.lookup(self.key)

    @property
    def kernel(self) -> str:
        """The kernel of ``nn.sdsl`` this layer runs."""
        return KERNELS[self.dtype_name]

    def structure(self) -> list[torch.Tensor]:
        return [buf for name, buf in self._buffers.items() if name.startswith("structure_")]

    def sparse_weight(self) -> SparseTensor:
        """The stored weight (int8 or bf16 values) as a SparseTensor sharing this module's tensors."""
        fmt = self.program.format(self.format)
        return SparseTensor.from_structure(fmt, (self.out_features, self.in_features), self.structure(), self.values)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(xq, sx)``, ``x ~= xq * sx[:, None]``: each row (token) of a 2-d input to int8 by its
        largest magnitude (a zero row gets scale 1), rounded to nearest and saturated by
        ``nn.sdsl``'s ``quantize_rows`` (one pass; torch's round, clamp and cast take three)."""
        x = x.float().contiguous()
        amax = x.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
        return self.program.kernels["quantize_rows"](x, 1 / scale), scale

    def dequantized(self) -> torch.Tensor:
        """The dense f32 weight this layer computes with."""
        dense = self.sparse_weight().to_dense().float()
        return dense * self.weight_scale[:, None]

    def _load_from_state_dict(self, state_dict, prefix, *args):
        """Validate an incoming structure and values first, as ``SparseLinear`` does."""
        names = [name for name in self._buffers if name.startswith("structure_")]
        values = state_dict.get(prefix + "values")
        if values is not None and values.dtype != self.values.dtype:
            raise PackError(
                f"state_dict of layer '{prefix.rstrip('.')}': values are {values.dtype}, "
                f"this layer stores {self.values.dtype}"
            )
        weight = incoming_weight(self, state_dict, prefix, names)
        if weight is not None:
            for n, buf in zip(names, weight.structure()):
                setattr(self, n, torch.empty_like(buf))
            self.values = torch.empty_like(values)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise ArgumentError(
                f"this layer takes inputs with {self.in_features} features in the last dimension, "
                f"got shape {tuple(x.shape)}"
            )
        flat = x.reshape(-1, self.in_features)
        kernel = self.program.kernels[self.kernel]
        weight = self.sparse_weight()
        if self.dtype_name == "int8":
            y = kernel(*self.quantize(flat), weight, self.weight_scale, self.bias)
        else:
            y = kernel(flat.to(torch.bfloat16).contiguous(), weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    density = SparseLinear.density  # stored values over the weight's size, as a SparseLinear says it

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
            f"dtype={self.dtype_name}, density={self.density:.3f}"
        )


def _rows_of(weight: SparseTensor) -> torch.Tensor:
    """The output row of each stored value (from the format's levels)."""
    fmt = weight.format
    rows, _ = fmt.indices(dict(zip(fmt.buffer_keys(), weight.structure())), tuple(weight.shape))
    return rows.long()


def _row_scales(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """Per output row, its largest stored magnitude / 127 (1 for a row that stores only zeros)."""
    amax = torch.zeros(n).scatter_reduce_(0, rows, values.abs(), "amax")
    return torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
