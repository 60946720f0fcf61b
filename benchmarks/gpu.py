"""The kernel table on an NVIDIA GPU (`python benchmarks/gpu.py`, or `benchmarks/kernels.py --device cuda`).

4096 x 4096 weights, 4096 tokens: sparsedsl's CUDA kernels against F.linear (cuBLAS), torch.sparse.mm
with CSR / BSR weights (cuSPARSE) and, for 2:4, to_sparse_semi_structured (cuSPARSELt), all on the
same pruned weight. Ratio = time / cuBLAS time, lower is better. Times are CUDA-event medians.
`--prebuild sm_90 --cache DIR` only builds the kernels into a cache (on a machine without a GPU), so
that the GPU machine needs neither TVM nor nvcc.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sparsedsl as sd  # noqa: E402

SOURCE = """
kernel lin32(X: f32[M, K], W: f32[N, K] @ CSR) -> (Y: f32[M, N]) { Y[m, n] = sum(k) X[m, k] * W[n, k] }
kernel lin16(X: f16[M, K], W: f16[N, K] @ CSR) -> (Y: f16[M, N]) { Y[m, n] = sum(k) X[m, k] * W[n, k] }
"""
KERNELS = {torch.float32: "lin32", torch.float16: "lin16"}
CASES = [
    ("BSR(32, 32)", 0.9, torch.float16),
    ("BSR(32, 32)", 0.9, torch.float32),
    ("CSR", 0.9, torch.float32),
    ("CSR", 0.9, torch.float16),
    ("NM(2, 4)", None, torch.float16),
    ("NM(2, 4)", None, torch.float32),
]


def cuda_time(fn, reps: int = 20) -> float:
    """Median seconds of ``fn`` with CUDA events, after a warm-up call."""
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


def _peer(convert, call, dense: float) -> float | str:
    """A torch peer's ratio to dense (``call`` on the weight ``convert()`` makes), or why it cannot run."""
    try:
        weight = convert()
        return cuda_time(lambda: call(weight)) / dense
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as err:
        return f"n/a: {str(err).splitlines()[0][:80]}"


def measure(prog, fmt: str, sparsity: float | None, dtype: torch.dtype, n: int, k: int, tokens: int) -> dict:
    """One row: sparsedsl and the torch peers as ratios to cuBLAS on the same pruned weight."""
    weight = sd.prune(torch.randn(n, k), prog.format(fmt), sparsity).to(dtype)
    packed = prog.pack(fmt, weight).cuda()
    w, x = weight.cuda(), torch.randn(tokens, k, dtype=dtype, device="cuda")
    kernel = prog.kernels[KERNELS[dtype]]
    ref = F.linear(x.float(), w.float())
    err = ((kernel(x, packed).float() - ref).norm() / ref.norm()).item()
    dense = cuda_time(lambda: F.linear(x, w))
    ours = cuda_time(lambda: kernel(x, packed))
    row = {"format": fmt, "sparsity": sparsity, "dtype": str(dtype).removeprefix("torch."), "dense_ms": dense * 1e3}
    row.update({"sparsedsl_ms": ours * 1e3, "sparsedsl": ours / dense, "rel_error": err})
    row["torch_csr"] = _peer(w.to_sparse_csr, lambda csr: torch.sparse.mm(csr, x.t()).t(), dense)
    if fmt.startswith("BSR"):
        row["torch_bsr"] = _peer(lambda: w.to_sparse_bsr((32, 32)), lambda bsr: torch.sparse.mm(bsr, x.t()).t(), dense)
    if fmt == "NM(2, 4)":
        semi = torch.sparse.to_sparse_semi_structured
        row["cusparselt"] = _peer(lambda: semi(w), lambda s: F.linear(x, s), dense)
    return row


def _cell(value) -> str:
    return f"{value:9.3f}" if isinstance(value, float) else f"{'n/a':>9}"


def run(out: Path, n: int = 4096, k: int = 4096, tokens: int = 4096) -> None:
    """Measure every case and print the table; the rows go to ``out`` as JSON."""
    if not torch.cuda.is_available():
        print("no CUDA GPU on this machine: the GPU table waits for one (CUDA code is still built and")
        print("compiled with nvcc by the tests)")
        return
    prog = sd.compile(SOURCE, target="cuda")
    rows = [measure(prog, fmt, sparsity, dtype, n, k, tokens) for fmt, sparsity, dtype in CASES]
    device = torch.cuda.get_device_name()
    print(f"\n{device}: {n}x{k} weight, {tokens} tokens; ratio = time / cuBLAS (F.linear) time, lower is better")
    header = f"{'format':<12} {'dtype':<8} {'cuBLAS ms':>9} {'sparsedsl':>9} {'torch CSR':>9} {'torch BSR':>9}"
    print(header + f" {'cuSPARSELt':>10} {'rel err':>8}")
    for r in rows:
        print(
            f"{r['format']:<12} {r['dtype']:<8} {r['dense_ms']:9.3f} {r['sparsedsl']:9.3f} {_cell(r['torch_csr'])} "
            f"{_cell(r.get('torch_bsr'))} {_cell(r.get('cusparselt')):>10} {r['rel_error']:8.1e}"
        )
    report = {"device": device, "torch": torch.__version__, "shape": [n, k, tokens], "rows": rows}
    out.write_text(json.dumps(report, indent=1))
    print(f"results written to {out}")


def prebuild(arch: str, cache: Path) -> None:
    """Build the table's kernels for ``arch`` into ``cache`` (no GPU needed)."""
    os.environ["SPARSEDSL_CACHE_DIR"] = str(cache)
    prog = sd.compile(SOURCE, target="cuda", arch=arch)
    for fmt, _, dtype in CASES:
        prog.kernels[KERNELS[dtype]].instance(prog.format(fmt))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results_cuda.json")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--prebuild", metavar="ARCH", help="only build the kernels for ARCH into --cache")
    parser.add_argument("--cache", type=Path, help="kernel cache for --prebuild")
    args = parser.parse_args()
    if args.prebuild:
        prebuild(args.prebuild, args.cache)
        print(f"built for {args.prebuild} into {args.cache}")
    else:
        run(args.out, tokens=args.tokens)


if __name__ == "__main__":
    main()
