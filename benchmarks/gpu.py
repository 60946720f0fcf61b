"""The kernel table on an NVIDIA GPU (`python benchmarks/gpu.py`, or `benchmarks/kernels.py --device cuda`).

4096 x 4096 weights, 4096 tokens: sparsedsl's CUDA kernels against F.linear (cuBLAS), torch.sparse.mm
with CSR / BSR weights (cuSPARSE) and, for 2:4, to_sparse_semi_structured (cuSPARSELt), all on the
same pruned weight (a BSR and an N:M row also on tensor cores: `tensorize`); then the two gradients of a sparse
layer against the dense products. Ratio = time / cuBLAS time, lower is better. Times are CUDA-event
medians.
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
from sparsedsl.runtime.program import index_type_choices  # noqa: E402

SOURCE = """
kernel lin32(X: f32[M, K], W: f32[N, K] @ CSR) -> (Y: f32[M, N]) { Y[m, n] = sum(k) X[m, k] * W[n, k] }
kernel lin16(X: f16[M, K], W: f16[N, K] @ CSR) -> (Y: f16[M, N]) { Y[m, n] = sum(k) X[m, k] * W[n, k] }
kernel lin16_tc(X: f16[M, K], W: f16[N, K] @ BSR(32, 32)) -> (Y: f16[M, N]) { Y[m, n] = sum(k) X[m, k] * W[n, k] }
schedule lin16_tc on cuda { tensorize }
kernel lin16_nm_tc(X: f16[M, K], W: f16[N, K] @ NM(2, 4)) -> (Y: f16[M, N]) { Y[m, n] = sum(k) X[m, k] * W[n, k] }
schedule lin16_nm_tc on cuda { tensorize }
kernel lin32_vec(X: f32[M, K], W: f32[N, K] @ CSR) -> (Y: f32[M, N]) { Y[m, n] = sum(k) X[m, k] * W[n, k] }
schedule lin32_vec on cuda { vectorize m_j }
kernel lin16_vec(X: f16[M, K], W: f16[N, K] @ CSR) -> (Y: f16[M, N]) { Y[m, n] = sum(k) X[m, k] * W[n, k] }
schedule lin16_vec on cuda { vectorize m_j }
kernel mv(W: f32[N, K] @ CSR, x: f32[K]) -> (y: f32[N]) { y[n] = sum(k) W[n, k] * x[k] }
kernel mv_t(W: f32[N, K] @ CSR, x: f32[N]) -> (y: f32[K]) { y[k] = sum(n) W[n, k] * x[n] }
kernel grad_input(G: f32[M, N], W: f32[N, K] @ CSR) -> (D: f32[M, K]) { D[m, k] = sum(n) G[m, n] * W[n, k] }
kernel grad_weight(G: f32[M, N], X: f32[M, K], W: f32[N, K] @ CSR) -> (D: f32[N, K] @ W) {
    D[n, k] = sum(m) G[m, n] * X[m, k]
}
"""
# (kernel, format, sparsity, dtype): the forward table
CASES = [
    ("lin16", "BSR(32, 32)", 0.9, torch.float16),
    ("lin16_tc", "BSR(32, 32)", 0.9, torch.float16),
    ("lin32", "BSR(32, 32)", 0.9, torch.float32),
    ("lin32", "CSR", 0.9, torch.float32),
    ("lin32_vec", "CSR", 0.9, torch.float32),
    ("lin16", "CSR", 0.9, torch.float16),
    ("lin16_vec", "NM(2, 4)", None, torch.float16),
    ("lin16", "NM(2, 4)", None, torch.float16),
    ("lin16_nm_tc", "NM(2, 4)", None, torch.float16),
    ("lin32", "NM(2, 4)", None, torch.float32),
]
BACKWARD = [("CSR", 0.9), ("BSR(32, 32)", 0.9)]  # the gradients of a f32 sparse layer
VECTORS = [("CSR", 0.9), ("COO", 0.9), ("BSR(32, 32)", 0.9)]  # matrix-vector products, f32


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


def measure(prog, name: str, fmt: str, sparsity: float | None, dtype: torch.dtype, n: int, k: int, tokens: int) -> dict:
    """One row: sparsedsl and the torch peers as ratios to cuBLAS on the same pruned weight."""
    weight = sd.prune(torch.randn(n, k), prog.format(fmt), sparsity).to(dtype)
    packed = prog.pack(fmt, weight).cuda()
    w, x = weight.cuda(), torch.randn(tokens, k, dtype=dtype, device="cuda")
    kernel = prog.kernels[name]
    ref = F.linear(x.float(), w.float())
    err = ((kernel(x, packed).float() - ref).norm() / ref.norm()).item()
    dense = cuda_time(lambda: F.linear(x, w))
    ours = cuda_time(lambda: kernel(x, packed))
    row = {"kernel": name, "format": fmt, "sparsity": sparsity, "dtype": str(dtype).removeprefix("torch.")}
    row["dense_ms"] = dense * 1e3
    row.update({"sparsedsl_ms": ours * 1e3, "sparsedsl": ours / dense, "rel_error": err})
    row["torch_csr"] = _peer(w.to_sparse_csr, lambda csr: torch.sparse.mm(csr, x.t()).t(), dense)
    if fmt.startswith("BSR"):
        row["torch_bsr"] = _peer(lambda: w.to_sparse_bsr((32, 32)), lambda bsr: torch.sparse.mm(bsr, x.t()).t(), dense)
    if fmt == "NM(2, 4)":
        semi = torch.sparse.to_sparse_semi_structured
        row["cusparselt"] = _peer(lambda: semi(w), lambda s: F.linear(x, s), dense)
    return row


def measure_backward(prog, fmt: str, sparsity: float, n: int, k: int, tokens: int) -> dict:
    """The two gradients of a f32 sparse layer (input: transposed product; weight: SDDMM on the
    pattern) as ratios to the dense products cuBLAS computes for them."""
    weight = sd.prune(torch.randn(n, k), prog.format(fmt), sparsity)
    packed, w = prog.pack(fmt, weight).cuda(), weight.cuda()
    g, x = torch.randn(tokens, n, device="cuda"), torch.randn(tokens, k, device="cuda")
    row = {"format": fmt, "sparsity": sparsity}
    for name, ours, dense, ref in [
        ("grad_input", lambda: prog.grad_input(g, packed), lambda: g @ w, lambda: g @ w),
        ("grad_weight", lambda: prog.grad_weight(g, x, packed).values, lambda: g.t() @ x, None),
    ]:
        base = cuda_time(dense)
        row[f"{name}_dense_ms"], row[name] = base * 1e3, cuda_time(ours) / base
        if ref is not None:
            row[f"{name}_rel_error"] = ((ours() - ref()).norm() / ref().norm()).item()
    return row


def measure_vectors(prog, fmt: str, sparsity: float, n: int, k: int) -> dict:
    """The matrix-vector products W x and W^T x as ratios to cuBLAS's dense ones, and torch CSR's."""
    weight = sd.prune(torch.randn(n, k), prog.format(fmt), sparsity)
    packed, w = prog.pack(fmt, weight).cuda(), weight.cuda()
    x, xt = torch.randn(k, device="cuda"), torch.randn(n, device="cuda")
    row = {"format": fmt, "sparsity": sparsity}
    for name, ours, dense, stored, v in [
        ("mv", lambda: prog.mv(packed, x), lambda: w @ x, w, x),
        ("mv_t", lambda: prog.mv_t(packed, xt), lambda: w.t() @ xt, w.t(), xt),  # torch: W^T stored as CSR
    ]:
        base = cuda_time(dense)
        row[name] = cuda_time(ours) / base
        row[f"{name}_torch_csr"] = _peer(stored.to_sparse_csr, lambda csr, v=v: torch.mv(csr, v), base)
        row[f"{name}_rel_error"] = ((ours() - dense()).norm() / dense().norm()).item()
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
    rows = [measure(prog, *case, n, k, tokens) for case in CASES]
    device = torch.cuda.get_device_name()
    print(f"\n{device}: {n}x{k} weight, {tokens} tokens; ratio = time / cuBLAS (F.linear) time, lower is better")
    header = f"{'kernel':<12} {'format':<12} {'dtype':<8} {'cuBLAS ms':>9} {'sparsedsl':>9} {'torch CSR':>9}"
    print(header + f" {'torch BSR':>9} {'cuSPARSELt':>10} {'rel err':>8}")
    for r in rows:
        peers = f"{_cell(r['torch_csr'])} {_cell(r.get('torch_bsr'))} {_cell(r.get('cusparselt')):>10}"
        print(
            f"{r['kernel']:<12} {r['format']:<12} {r['dtype']:<8} {r['dense_ms']:9.3f} {r['sparsedsl']:9.3f} "
            f"{peers} {r['rel_error']:8.1e}"
        )
    backward = [measure_backward(prog, fmt, sparsity, n, k, tokens) for fmt, sparsity in BACKWARD]
    print("\nbackward, f32: ratio = time / the dense product's cuBLAS time (G @ W, G^T @ X)")
    for r in backward:
        print(f"{r['format']:<12} grad_input {r['grad_input']:7.3f}   grad_weight (SDDMM) {r['grad_weight']:7.3f}")
    vectors = [measure_vectors(prog, fmt, sparsity, n, k) for fmt, sparsity in VECTORS]
    print("\nmatrix-vector, f32: ratio = time / cuBLAS's dense product time (torch CSR alongside)")
    for r in vectors:
        print(
            f"{r['format']:<12} W x {r['mv']:7.3f} (torch CSR {_cell(r['mv_torch_csr'])})   "
            f"W^T x {r['mv_t']:7.3f} (torch CSR {_cell(r['mv_t_torch_csr'])})"
        )
    report = {"device": device, "torch": torch.__version__, "shape": [n, k, tokens], "rows": rows}
    report.update(backward=backward, vectors=vectors)
    out.write_text(json.dumps(report, indent=1))
    print(f"results written to {out}")


def prebuild(arch: str, cache: Path) -> None:
    """Build the table's kernels for ``arch`` into ``cache`` (no GPU needed)."""
    os.environ["SPARSEDSL_CACHE_DIR"] = str(cache)
    prog = sd.compile(SOURCE, target="cuda", arch=arch)
    pairs = [(name, fmt) for name, fmt, _, _ in CASES]
    pairs += [(name, fmt) for fmt, _ in BACKWARD for name in ("grad_input", "grad_weight")]
    pairs += [(name, fmt) for fmt, _ in VECTORS for name in ("mv", "mv_t")]
    for name, fmt in pairs:
        for types in index_type_choices(prog.format(fmt)):  # the table's shapes pick one
            prog.kernels[name].instance(prog.format(fmt), types)


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
