"""``QuantizedSparseLinear``: a sparse linear layer whose stored values are int8 (one f32 scale per
output channel, activations quantized per token when called) or bf16, for inference.

int8: ``y = (sum_k xq[m, k] wq[n, k]) * sx[m] * sw[n] + b[n]``, the sum exact in int32 and the
dequantization and bias in the kernel's epilogue (``nn.sdsl``'s ``qlinear_bias``). The
weight is quantized symmetrically per output row (``sw = max |w[n, :]| / 127``), the activations
per token (``sx = max |x[m, :]| / 127``) when the layer is called (dynamic quantization), or by one
scale measured ahead on calibration inputs (static: the ``input_scale`` buffer, the 99.99th
percentile of ``|x|`` / 127).
bf16: values and activations in bf16, products summed in f32 (``blinear_bias``).

A layer may apply an activation in its kernel's epilogue (``activation``: ``qlinear_bias_gelu``),
and write the next layer's int8 input itself (``emit_int8``: ``qlinear_bias_gelu_quant``, its
output divided by the next layer's static scale, rounded and saturated by the store); a static
layer called on an int8 tensor takes it as already quantized by its ``input_scale``.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsedsl.errors import ArgumentError, PackError
from sparsedsl.frontend.check import QUANTIZED_ACTIVATIONS, QUANTIZED_DTYPES
from sparsedsl.runtime import ops
from sparsedsl.runtime.modules import SparseLinear, incoming_weight, kept_weight
from sparsedsl.runtime.program import Program
from sparsedsl.runtime.prune import Gram, prune
from sparsedsl.runtime.sparse_tensor import SparseTensor

QMAX = 127  # symmetric int8: -127..127, so that -x is representable for every x
KERNELS = {"int8": "qlinear_bias", "bf16": "blinear_bias"}  # nn.sdsl's, per dtype


def quantized_kernel(dtype: str, activation: str | None = None, emits_int8: bool = False) -> str:
    """The kernel of ``nn.sdsl`` a quantized layer runs: ``qlinear_bias[_gelu][_quant]``."""
    return KERNELS[dtype] + (f"_{activation}" if activation else "") + ("_quant" if emits_int8 else "")


# A static scale maps this quantile of the calibration inputs' magnitudes to 127, the rarer larger
# ones saturating: on MiniLM 90% BSR(4, 1) it keeps a sentence cosine of 0.9993 against the f32
# sparse model where the largest magnitude keeps 0.9969 (99.999%: 0.9975, 99.9%: 0.9974;
# docs/BENCHMARKS.md, "Static int8 scales").
STATIC_QUANTILE = 0.9999


def static_scale(magnitude: float) -> float:
    """The static scale of inputs whose ``STATIC_QUANTILE`` magnitude is ``magnitude`` (1 if 0)."""
    return magnitude / QMAX if magnitude > 0 else 1.0


class QuantizedSparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` sparse and stored as int8 values and per-output-channel scales
    (``dtype="int8"``) or bf16 values (``dtype="bf16"``), then ``activation`` (None, ``"gelu"`` or
    ``"relu"``) applied in the kernel. An int8 layer with an ``input_scale`` quantizes its inputs by
    that one scale (static), else each token by its own. Inference only: the values are buffers,
    not parameters. ``state_dict`` holds the values in their dtype, the scales (``input_scale`` of
    a static layer, ``output_scale`` of one that emits the next layer's int8 input), the bias and
    the structure."""

    def __init__(
        self,
        weight: SparseTensor,
        dtype: str,
        bias: torch.Tensor | None = None,
        program: Program | None = None,
        activation: str | None = None,
        input_scale: float | None = None,
    ):
        super().__init__()
        if dtype not in QUANTIZED_DTYPES:
            raise ArgumentError(f"quantized layers are {' or '.join(QUANTIZED_DTYPES)}, not {dtype!r}")
        if activation is not None and activation not in QUANTIZED_ACTIVATIONS:
            known = " or ".join(QUANTIZED_ACTIVATIONS)
            raise ArgumentError(f"a quantized layer's kernel applies {known}, not {activation!r}")
        if input_scale is not None and (dtype != "int8" or not input_scale > 0):
            raise ArgumentError(f"a static input scale is a number > 0 of an int8 layer, got {input_scale!r} ({dtype})")
        self.key = ops.register(program if program is not None else ops.nn_program())
        self.dtype_name = dtype
        self.activation = activation
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
        if input_scale is not None:
            self.register_buffer("input_scale", torch.tensor(float(input_scale)))

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
        activation: str | None = None,
        input_scale: float | None = None,
    ) -> QuantizedSparseLinear:
        """``linear`` pruned (as ``SparseLinear.from_linear``) and stored as ``dtype``."""
        program = program if program is not None else ops.nn_program()
        weight = linear.weight.detach().float()
        if sparsity is not None or method is not None:
            weight = prune(weight, program.format(format), sparsity, method=method or "magnitude", inputs=inputs)
        return cls(program.pack(format, weight), dtype, linear.bias, program, activation, input_scale)

    @property
    def program(self) -> Program:
        return ops.lookup(self.key)

    @property
    def kernel(self) -> str:
        """The kernel of ``nn.sdsl`` this layer runs."""
        return quantized_kernel(self.dtype_name, self.activation, self.emits_int8)

    @property
    def static(self) -> bool:
        """Whether the inputs are quantized by one calibrated scale (``input_scale``)."""
        return "input_scale" in self._buffers

    @property
    def emits_int8(self) -> bool:
        """Whether the layer writes int8 outputs, quantized by ``output_scale`` (the next layer's input scale)."""
        return "output_scale" in self._buffers

    def emit_int8(self, scale: torch.Tensor | None) -> None:
        """Write outputs quantized by ``scale`` (the static ``input_scale`` of the one layer they
        feed), or floats again (None)."""
        if scale is not None and self.dtype_name != "int8":
            raise ArgumentError(f"a {self.dtype_name} layer's kernel writes floats only")
        if scale is None:
            self._buffers.pop("output_scale", None)
        else:
            self.register_buffer("output_scale", scale.detach().clone())

    def structure(self) -> list[torch.Tensor]:
        return [buf for name, buf in self._buffers.items() if name.startswith("structure_")]

    def sparse_weight(self) -> SparseTensor:
        """The stored weight (int8 or bf16 values) as a SparseTensor sharing this module's tensors
        (kept while they are the same: ``modules.kept_weight``)."""
        return kept_weight(self, self.values, self.structure())

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(xq, sx)``, ``x ~= xq * sx[:, None]``: each row (token) of a 2-d input to int8 by its
        largest magnitude (a zero row gets scale 1), or every row by ``input_scale`` (static),
        rounded to nearest and saturated by ``nn.sdsl``'s ``quantize_rows`` (one pass; torch's
        round, clamp and cast take three)."""
        x = x.float().contiguous()
        if self.static:
            scale = self._static_scales(len(x))
        else:
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
            inputs = self._quantized(flat) if flat.dtype == torch.int8 else self.quantize(flat)
            requantize = (float(1 / self.output_scale),) if self.emits_int8 else ()
            y = kernel(*inputs, weight, self.weight_scale, self.bias, *requantize)
        else:
            y = kernel(flat.to(torch.bfloat16).contiguous(), weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _quantized(self, xq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(xq, sx)`` for inputs already quantized by the layer before (by ``input_scale``)."""
        if not self.static:
            raise ArgumentError(
                "this layer quantizes its inputs per token: it takes int8 inputs only with a static input scale"
            )
        return xq.contiguous(), self._static_scales(len(xq))

    def _static_scales(self, tokens: int) -> torch.Tensor:
        """``input_scale`` for each of ``tokens`` tokens (the kernels take a scale a token)."""
        return self.input_scale.expand(tokens).contiguous()

    density = SparseLinear.density  # stored values over the weight's size, as a SparseLinear says it

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
            f"dtype={self.dtype_name}, density={self.density:.3f}"
            + (f", activation={self.activation}" if self.activation else "")
            + (f", input_scale={float(self.input_scale):.4g}" if self.static else "")
            + (f", output_scale={float(self.output_scale):.4g}" if self.emits_int8 else "")
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
