"""Building CUDA kernels: CUDA C from TVM's generator, a cubin from nvcc, a ``CudaModule`` from both,
through the on-disk cache. A cache hit needs neither TVM nor nvcc (a GPU machine can run kernels
built elsewhere for its architecture)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from functools import cache as memoize
from pathlib import Path

from sparsedsl import cache
from sparsedsl.backends.cuda.module import CudaModule, Launch, default_arch
from sparsedsl.errors import BackendError
from sparsedsl.ir import loop_ir as L
from sparsedsl.ir.gpu import launch_dims

_GENERATOR = ("backends/tvm/tir.py", "backends/tvm/cuda.py", "backends/cuda/module.py", "backends/cuda/build.py")


@memoize
def _generator_digest() -> str:
    """A hash of the code generator's own source: a change to it invalidates cached kernels."""
    root = Path(__file__).parent.parent.parent
    return hashlib.sha256(b"".join((root / f).read_bytes() for f in _GENERATOR)).hexdigest()


def compile_cubin(source: str, arch: str, name: str) -> bytes:
    """CUDA C -> a cubin for ``arch`` with nvcc."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise BackendError("nvcc is not installed (or not on PATH): CUDA kernels cannot be compiled here")
    with tempfile.TemporaryDirectory(prefix="sparsedsl-cuda-") as tmp:
        cu, cubin = Path(tmp) / f"{name}.cu", Path(tmp) / f"{name}.cubin"
        cu.write_text(source)
        cmd = [nvcc, "-cubin", "-O3", f"-arch={arch}", "-o", str(cubin), str(cu)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BackendError(f"nvcc could not compile '{name}' for {arch}:\n{result.stderr.strip()[-2000:]}")
        return cubin.read_bytes()


def build(funcs: list[L.LoopFunc], arch: str | None = None, cache_dir: Path | None = None) -> CudaModule:
    """Compile GPU-mapped loop functions for ``arch`` (``sm_80``, ``sm_90``...), through the cache."""
    arch = arch or default_arch()
    key = cache.key_of(*(L.func_str(f) for f in funcs), "cuda", arch, _generator_digest())
    if cache_dir is not None:
        module = cache.lookup(Path(cache_dir), key, CudaModule.load, ".json")
        if module is not None:
            return module
    from sparsedsl.backends.tvm.cuda import generate

    source, tir = generate(funcs, arch)
    cubin = compile_cubin(source, arch, funcs[0].name)
    module = CudaModule(arch, source, cubin, {f.name: Launch.all_of(f, source, launch_dims(f)) for f in funcs}, tir)
    if cache_dir is not None:
        cache.store(Path(cache_dir), key, module.export, ".json")
    return module
