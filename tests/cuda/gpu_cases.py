"""The kernels the GPU tests run: the epilogue kernels of tests/kernels in f32, f16 and bf16.

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
from tests.strategies import FORMATS

SOURCE = (Path(__file__).parent.parent / "kernels" / "epilogues.sdsl").read_text()
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
KERNELS = {
    "f32": ["plain", "bias_gelu", "scaled_residual", "transposed", "sddmm", "sddmm_scaled"],
    "f16": ["bias_gelu", "scaled_residual", "transposed", "sddmm"],
    "bf16": ["bias_gelu", "scaled_residual", "transposed", "sddmm"],
}


MODEL_FORMATS = ("BSR(4, 1)", "NM(2, 4)")


def program(dtype: str, **options) -> sd.Program:
    """The epilogue kernels with every tensor in ``dtype``."""
    return sd.compile(SOURCE.replace("f32", dtype), target="cuda", **options)


def prebuild(arch: str, cache_dir: Path) -> int:
    """Build every (dtype, kernel, format) the GPU tests use into ``cache_dir``, and the layer
    kernels (with their gradients) of the compile_model test."""
    os.environ["SPARSEDSL_CUDA_ARCH"] = arch
    os.environ["SPARSEDSL_CACHE_DIR"] = str(cache_dir)
    nn = ops.nn_program(target="cuda")
    count = 0
    for fmt in MODEL_FORMATS:
        for kernel in nn.kernels.values():
            kernel.instance(nn.format(fmt))
            count += 1
    for dtype, names in KERNELS.items():
        prog = program(dtype, arch=arch, cache_dir=cache_dir)
        for name in names:
            for fmt, _, _ in FORMATS:
                prog.kernels[name].instance(prog.format(fmt))
                count += 1
    return count


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--cache", type=Path, required=True)
    args = parser.parse_args()
    print(f"{prebuild(args.arch, args.cache)} kernels built for {args.arch} into {args.cache}")
