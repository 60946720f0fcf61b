"""sparsedsl: a compiler for sparse deep-learning kernels.

import sparsedsl as sd
prog = sd.compile("examples/linear.sdsl")
W = prog.pack("BSR(4, 1)", dense_weight)
Y = prog.linear(X, W, b)
"""

import os

# torch's OpenMP workers spin after each op and starve the kernels' own thread pool when a model
# alternates between the two; passive waiting costs dense torch nothing measurable here. OpenMP
# reads this when torch is first imported, so it only helps when sparsedsl is imported first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from sparsedsl.errors import (  # noqa: E402
    ArgumentError,
    BackendError,
    PackError,
    ScheduleError,
    SdslError,
    SdslSemanticError,
    SdslSyntaxError,
    SourceFileError,
)
from sparsedsl.runtime.aot import load  # noqa: E402
from sparsedsl.runtime.distill import distill  # noqa: E402
from sparsedsl.runtime.model import compile_model, report  # noqa: E402
from sparsedsl.runtime.model import prune_to as prune  # noqa: E402
from sparsedsl.runtime.modules import SparseLinear  # noqa: E402
from sparsedsl.runtime.program import Program, compile  # noqa: E402
from sparsedsl.runtime.sparse_tensor import SparseTensor  # noqa: E402
from sparsedsl.version import __version__ as __version__  # noqa: E402

__all__ = [
    "ArgumentError",
    "BackendError",
    "PackError",
    "Program",
    "ScheduleError",
    "SdslError",
    "SdslSemanticError",
    "SdslSyntaxError",
    "SourceFileError",
    "SparseLinear",
    "SparseTensor",
    "compile",
    "compile_model",
    "distill",
    "load",
    "prune",
    "report",
]
