"""sparsedsl: a compiler for sparse deep-learning kernels.

import sparsedsl as sd
prog = sd.compile("examples/linear.sdsl")
W = prog.pack("BSR(4, 1)", dense_weight)
Y = prog.linear(X, W, b)
"""

from sparsedsl.errors import (
    ArgumentError,
    BackendError,
    PackError,
    ScheduleError,
    SdslError,
    SdslSemanticError,
    SdslSyntaxError,
    SourceFileError,
)
from sparsedsl.runtime.aot import build, load
from sparsedsl.runtime.attention import attention
from sparsedsl.runtime.distill import distill
from sparsedsl.runtime.fused import ResidualNorm
from sparsedsl.runtime.model import compile_model, report
from sparsedsl.runtime.model import prune_to as prune
from sparsedsl.runtime.modules import SparseLinear
from sparsedsl.runtime.program import Program, compile
from sparsedsl.runtime.quantized import QuantizedSparseLinear
from sparsedsl.runtime.sparse_tensor import SparseTensor
from sparsedsl.version import __version__ as __version__

__all__ = [
    "ArgumentError",
    "BackendError",
    "PackError",
    "Program",
    "QuantizedSparseLinear",
    "ResidualNorm",
    "ScheduleError",
    "SdslError",
    "SdslSemanticError",
    "SdslSyntaxError",
    "SourceFileError",
    "SparseLinear",
    "SparseTensor",
    "attention",
    "build",
    "compile",
    "compile_model",
    "distill",
    "load",
    "prune",
    "report",
]
