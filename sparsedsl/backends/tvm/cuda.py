"""TVM's CUDA backend: loop IR mapped to a grid (ir/gpu.py) -> tirx -> tvm.compile (nvcc)."""

from __future__ import annotations

from dataclasses import dataclass

import tvm

from sparsedsl.backends.tvm.tir import to_tir
from sparsedsl.errors import BackendError
from sparsedsl.ir import loop_ir as L

DEFAULT_ARCH = "sm_80"


def default_arch() -> str:
    """The visible GPU's architecture, else sm_80."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"sm_{major}{minor}"
    return DEFAULT_ARCH


@dataclass
class Built:
    """Compiled CUDA kernels: the TVM module (host code plus the CUDA module it imports)."""

    module: tvm.runtime.Module
    functions: dict[str, object]
    prims: dict

    def source(self, stage: str) -> str:
        if stage == "tir":
            return "\n\n".join(p.script() for p in self.prims.values())
        if stage == "cuda":
            return self.module.mod.imports[0].inspect_source()
        raise BackendError(f"the cuda target emits 'tir' and 'cuda', not '{stage}'")

    def export(self, path) -> None:
        self.module.export_library(str(path))


def build(funcs: list[L.LoopFunc], arch: str | None = None) -> Built:
    """Compile GPU-mapped loop functions for ``arch`` (``sm_80``, ``sm_90``...)."""
    prims = {f.name: to_tir(f) for f in funcs}
    target = tvm.target.Target({"kind": "cuda", "arch": arch or default_arch()})
    try:
        module = tvm.compile(tvm.IRModule(prims), target=target)
    except Exception as err:  # noqa: BLE001 - TVM and nvcc errors come as TVM's own types
        raise BackendError(f"CUDA build of '{funcs[0].name}' failed: {str(err).strip().splitlines()[-1]}") from None
    return Built(module, {name: module[name] for name in prims}, prims)
