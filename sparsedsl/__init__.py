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
)
from sparsedsl.runtime.program import Program, compile
from sparsedsl.runtime.sparse_tensor import SparseTensor

__all__ = [
    "ArgumentError",
    "BackendError",
    "PackError",
    "Program",
    "ScheduleError",
    "SdslError",
    "SdslSemanticError",
    "SdslSyntaxError",
    "SparseTensor",
    "compile",
]
__version__ = "0.1.0"
