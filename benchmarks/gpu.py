"""The kernel table on an NVIDIA GPU (`benchmarks/kernels.py --device cuda` runs this).

4096 x 4096 weights, 4096 tokens: sparsedsl's CUDA kernels against F.linear (cuBLAS),
torch.sparse.mm with CSR / BSR weights (cuSPARSE) and, for 2:4, to_sparse_semi_structured
(cuSPARSELt). Ratio = time / dense time, lower is better.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

import sparsedsl as sd

SOURCE = """
kernel lin32(X: f32[M, K], W: f32[N, K] @ CSR) -> (Y: f32[M, N]) { Y[m, n] = sum(k) X[m, k] * W[n, k] }
kernel lin16(X: f16[M, K], W: f16[N, K] @ CSR) -> (Y: f16[M, N]) { Y[m, n] = sum(k) X[m, k] * W[n, k] }
"""
CASES = [("BSR(32, 32)", 0.9, torch.float16), ("CSR", 0.9, torch.float32), ("NM(2, 4)", 0.5, torch.float16)]


def cuda_time(fn, reps: int = 20) -> float:
    """Median seconds of ``fn`` with CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def measure(prog, fmt: str, sparsity: float, dtype: torch.dtype, n: int, k: int, tokens: int) -> dict:
    """One row: sparsedsl and the torch peers as ratios to cuBLAS on the same pruned weight."""
    weight = sd.prune(torch.randn(n, k), fmt, sparsity).to(dtype)
    packed = prog.pack(fmt, weight)
    packed.buffers.update({name: t.cuda() for name, t in packed.buffers.items()})
    w, x = weight.cuda(), torch.randn(tokens, k, dtype=dtype, device="cuda")
    kernel = prog.lin16 if dtype == torch.float16 else prog.lin32
    dense = cuda_time(lambda: F.linear(x, w))
    row = {"format": fmt, "dtype": str(dtype), "sparsedsl": cuda_time(lambda: kernel(x, packed)) / dense}
    csr = w.to_sparse_csr()
    row["torch_csr"] = cuda_time(lambda: torch.sparse.mm(csr, x.t()).t()) / dense
    if fmt.startswith("BSR"):
        bsr = w.to_sparse_bsr((32, 32))
        row["torch_bsr"] = cuda_time(lambda: torch.sparse.mm(bsr, x.t()).t()) / dense
    if fmt == "NM(2, 4)":
        semi = torch.sparse.to_sparse_semi_structured(w)
        row["cusparselt"] = cuda_time(lambda: F.linear(x, semi)) / dense
    return row


def run(out: Path, n: int = 4096, k: int = 4096, tokens: int = 4096) -> None:
    if not torch.cuda.is_available():
        print("no CUDA GPU on this machine: the GPU table waits for one (CUDA code is still built and")
        print("compiled with nvcc by the tests)")
        return
    prog = sd.compile(SOURCE, target="cuda")
    rows = []
    for fmt, sparsity, dtype in CASES:
        rows.append(measure(prog, fmt, sparsity, dtype, n, k, tokens))
        print(rows[-1])
    device = torch.cuda.get_device_name()
    out.write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    print(f"{device}: results written to {out}")
