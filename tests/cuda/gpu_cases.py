"""The kernels the GPU tests run: the epilogue kernels of tests/kernels in f32, f16 and bf16, and
kernels under GPU schedules (shared-memory staging, cross-thread sums, tensor cores).

``python -m tests.cuda.gpu_cases --arch sm_90 --cache DIR`` builds all of them into a kernel cache
ahead of time, so that a GPU machine without TVM or nvcc runs the tests from that cache
(``SPARSEDSL_CACHE_DIR=DIR``): CUDA kernels load as cubins through the driver.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import sparsedsl as sd
from sparsedsl.runtime import ops
from sparsedsl.runtime.program import index_type_choices
from tests.strategies import FORMATS

SOURCE = (Path(__file__).parent.parent / "kernels" / "epilogues.sdsl").read_text()
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
KERNELS = {
    "f32": ["plain", "bias_gelu", "scaled_residual", "transposed", "sddmm", "sddmm_scaled", "matvec", "matvec_t"],
    "f16": ["bias_gelu", "scaled_residual", "transposed", "sddmm", "matvec", "matvec_t"],
    "bf16": ["bias_gelu", "scaled_residual", "transposed", "sddmm", "matvec", "matvec_t"],
}


MODEL_FORMATS = ("BSR(4, 1)", "NM(2, 4)")

SDDMM = """
kernel sddmm(A: f32[M, N], B: f32[M, K], S: f32[N, K] @ CSR) -> (Y: f32[N, K] @ S) {
    Y[n, k] = sum(m) A[m, n] * B[m, k]
}
"""
WARP_THREADS = (32, 64, 96, 128)


def warp_schedule(threads: int) -> str:
    """SDDMM with its token sum spread over ``threads`` threads (a cross-thread reduction)."""
    directives = f"split m by {threads} into mo, mt; reorder mt, mo; bind mt to threadIdx.x"
    return f"{SDDMM}schedule sddmm on cuda {{ {directives} }}"


# per format: the loop of the linear layer and of the transposed product that walks the stored
# values, directly inside the thread loop (``stage`` places the copy there)
STAGED = [
    ("CSR", "k", "n"),
    ("CSC", "k", "n"),
    ("COO", "n", "n"),
    ("BSR(4, 1)", "k", "n_o"),
    ("BSR(16, 16)", "k_o", "n_o"),
    ("ELL(3)", "k", "n"),
]


def staged_source(fmt: str, linear_loop: str, transposed_loop: str) -> str:
    """A linear layer and a transposed product on ``fmt`` that stage their activations in shared
    memory."""
    return f"""
kernel lin(X: f32[M, K], W: f32[N, K] @ {fmt}, b: f32[N]) -> (Y: f32[M, N]) {{
    Y[m, n] = gelu(sum(k) X[m, k] * W[n, k] + b[n])
}}
kernel tr(G: f32[M, N], W: f32[N, K] @ {fmt}) -> (Y: f32[M, K]) {{
    Y[m, k] = sum(n) G[m, n] * W[n, k]
}}
schedule lin on cuda {{ stage X in shared at {linear_loop} }}
schedule tr on cuda {{ stage G in shared at {transposed_loop} }}
"""


# (format, dtype, token tile) of the tensor-core kernels
TENSOR_CORES = [
    ("BSR(16, 16)", "f16", 64),
    ("BSR(32, 16)", "f16", 64),
    ("BSR(16, 32)", "bf16", 32),
    ("BSR(32, 32)", "f16", 128),
]


# N:M kernels on tensor cores (weight tiles decompressed in shared memory)
TENSOR_CORES_NM = [
    ("NM(2, 4)", "f16", 64),
    ("NM(1, 4)", "f16", 128),
    ("NM(2, 8)", "bf16", 64),
]


def tensor_core_source(fmt: str, dtype: str, tile: int) -> str:
    """A linear layer with bias and GELU on ``fmt`` (blocks or N:M), on tensor cores."""
    return f"""
kernel lin(X: {dtype}[M, K], W: {dtype}[N, K] @ {fmt}, b: {dtype}[N]) -> (Y: {dtype}[M, N]) {{
    Y[m, n] = gelu(sum(k) X[m, k] * W[n, k] + b[n])
}}
schedule lin on cuda {{ tile m by {tile}; tensorize }}
"""


# (format, dtype) of linear layers whose threads read their tokens as vectors
VECTOR_TOKENS = [("CSR", "f32"), ("BSR(4, 4)", "f32"), ("NM(2, 4)", "f16"), ("ELL(3)", "f32"), ("BSR(16, 16)", "bf16")]
# the prelude formats whose linear layer gathers (CSC and COO scatter: no tokens to share out)
GATHERING = [case for case in FORMATS if case[0] not in ("CSC", "COO", "VNM")]


def vector_source(fmt: str, dtype: str) -> str:
    """A linear layer with bias and GELU on ``fmt`` whose threads each take adjacent tokens, read
    from the (padded, transposed) activations as one vector."""
    return f"""
kernel lin(X: {dtype}[M, K], W: {dtype}[N, K] @ {fmt}, b: {dtype}[N]) -> (Y: {dtype}[M, N]) {{
    Y[m, n] = gelu(sum(k) X[m, k] * W[n, k] + b[n])
}}
schedule lin on cuda {{ vectorize m_j }}
"""


def scheduled_programs(**options) -> list[sd.Program]:
    """The programs with GPU schedules that the GPU tests run (staging, cross-thread sums, tensor
    cores, vector loads)."""
    sources = [staged_source(*case) for case in STAGED] + [warp_schedule(t) for t in WARP_THREADS]
    sources += [tensor_core_source(*case) for case in TENSOR_CORES + TENSOR_CORES_NM]
    sources += [vector_source(*case) for case in VECTOR_TOKENS]
    return [sd.compile(source, target="cuda", **options) for source in sources]


def program(dtype: str, **options) -> sd.Program:
    """The epilogue kernels with every tensor in ``dtype``."""
    return sd.compile(SOURCE.replace("f32", dtype), target="cuda", **options)


def _every_index_type(kernel, fmt) -> int:
    """Build ``kernel`` for every set of index types a tensor in ``fmt`` can have (the tests' shapes
    decide which they meet); returns how many."""
    choices = index_type_choices(fmt)
    for types in choices:
        kernel.instance(fmt, types)
    return len(choices)


def prebuild(arch: str, cache_dir: Path) -> int:
    """Build every (dtype, kernel, format) the GPU tests use into ``cache_dir``, and the layer
    kernels (with their gradients) of the compile_model test."""
    os.environ["SPARSEDSL_CUDA_ARCH"] = arch
    os.environ["SPARSEDSL_CACHE_DIR"] = str(cache_dir)
    nn = ops.nn_program(target="cuda")
    count = 0
    for fmt in MODEL_FORMATS:
        for kernel in nn.kernels.values():
            if not kernel.kernel.rowwise:  # no GPU mapping of row-wise kernels yet (a BackendError)
                count += _every_index_type(kernel, nn.format(fmt))
    for dtype, names in KERNELS.items():
        prog = program(dtype, arch=arch, cache_dir=cache_dir)
        for name in names:
            for fmt, _, _ in FORMATS:
                count += _every_index_type(prog.kernels[name], prog.format(fmt))
    for prog in scheduled_programs(arch=arch, cache_dir=cache_dir):
        for kernel in prog.kernels.values():
            kernel.instance()
            count += 1
    return count


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--cache", type=Path, required=True)
    args = parser.parse_args()
    print(f"{prebuild(args.arch, args.cache)} kernels built for {args.arch} into {args.cache}")
