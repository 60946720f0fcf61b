"""Kernel benchmarks: sparsedsl against dense F.linear, torch.sparse and scipy, same process.

Prints a table of time ratios to dense ``F.linear`` (lower is better; the flop limit is the
density), writes JSON, and sweeps sparsity for one BERT shape into docs/img/speedup.png.

    python benchmarks/kernels.py [--quick] [--threads 2] [--out benchmarks/results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import scipy.sparse
import torch
import torch.nn.functional as F
from tqdm import tqdm

import sparsedsl as sd
from sparsedsl.backends.tvm.cpu import host_cpu
from sparsedsl.runtime.prune import prune
from sparsedsl.timing import median_time

ROOT = Path(__file__).resolve().parents[1]
BERT = [(768, 768), (3072, 768), (768, 3072)]
FORMATS_90 = ["CSR", "BSR(4, 1)", "BSR(16, 16)", "BSR(32, 32)"]
STRUCTURED = ["NM(2, 4)", "NM(1, 4)", "NM(2, 8)"]
ROUNDS = 3  # rounds over the libraries of a row (measure)


def comparison_parser(doc: str) -> argparse.ArgumentParser:
    """The options shared by the scripts that compare builds of one kernel (kblock.py, coo_rows.py)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backend", choices=("tvm", "llvm"), default="tvm")
    parser.add_argument("--threads", type=int, default=2)
    return parser


def rule_chosen_threads(threads: int) -> None:
    """``threads`` for torch and the kernels, and the default variant rule (``schedule.pick``)
    instead of a measured choice, so that builds are compared on the same variant."""
    torch.set_num_threads(threads)
    os.environ["SPARSEDSL_NUM_THREADS"] = str(threads)
    os.environ["SPARSEDSL_TUNE"] = "0"


def decode_cases() -> list[dict]:
    """A few tokens (decoding) through a 4096 x 4096 weight: 90% unstructured and blocked, and N:M."""
    formats = [("CSR", 0.9), ("BSR(4, 1)", 0.9)] + [(f, None) for f in STRUCTURED]
    return [{"tokens": t, "n": 4096, "k": 4096, "fmt": f, "sparsity": s} for t in (16, 8, 4, 1) for f, s in formats]


def cases(quick: bool) -> list[dict]:
    """(tokens, N, K, format, sparsity) rows of the main table."""
    rows = []
    for n, k in BERT[:1] if quick else BERT:
        rows.append({"tokens": 128, "n": n, "k": k, "fmt": "CSR", "sparsity": 0.7})
        rows += [{"tokens": 128, "n": n, "k": k, "fmt": f, "sparsity": 0.9} for f in FORMATS_90]
        rows += [{"tokens": 128, "n": n, "k": k, "fmt": f, "sparsity": None} for f in STRUCTURED]
    if not quick:
        for n, k in [(384, 384), (1536, 384), (384, 1536)]:  # MiniLM's layers (issue 14, item 6)
            rows += [{"tokens": 1024, "n": n, "k": k, "fmt": f, "sparsity": 0.9} for f in ("CSR", "BSR(4, 1)")]
            rows.append({"tokens": 128, "n": n, "k": k, "fmt": "BSR(4, 1)", "sparsity": 0.9})
        rows += decode_cases()
    return rows


def measure(progs: dict, case: dict, reps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    n, k, m = case["n"], case["k"], case["tokens"]
    prog = progs["tvm"]
    fmt = prog.format(case["fmt"])
    weight = prune(torch.randn(n, k, generator=gen) / k**0.5, fmt, case["sparsity"])
    packed = prog.pack(fmt, weight)
    x = torch.randn(m, k, generator=gen)
    bias = torch.zeros(n)
    out = prog.linear(x, packed, bias)
    error = (out - F.linear(x, weight, bias)).abs().max().item()
    csr = weight.to_sparse_csr()
    sp = scipy.sparse.csr_matrix(weight.numpy())
    xn = x.numpy()
    fns = {
        "dense": lambda: F.linear(x, weight, bias),
        "sparsedsl": lambda: prog.linear(x, packed, bias),
        "torch_csr": lambda: torch.sparse.mm(csr, x.t()).t(),
        "scipy_csr": lambda: (sp @ xn.T).T,
    }
    fns.update({name: (lambda p=other: p.linear(x, packed, bias)) for name, other in progs.items() if name != "tvm"})
    block = tuple(int(v) for v in case["fmt"][4:-1].split(",")) if case["fmt"].startswith("BSR") else None
    if block is not None and block[0] == block[1]:  # torch's CPU BSR takes square blocks only
        bsr = weight.to_sparse_bsr(block)
        fns["torch_bsr"] = lambda: torch.sparse.mm(bsr, x.t()).t()
    # each in its own hot loop, dense first: the steady state of each library (interleaving them
    # call by call measures their thread pools waking each other instead; docs/BENCHMARKS.md), in
    # ROUNDS rounds, the median of the rounds' medians: the memory bandwidth these machines leave
    # a few-token call drifts over seconds, and rounds spread the drift over every library alike
    rounds = {name: [] for name in fns}
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            rounds[name].append(median_time(fn, reps, budget=0.5 / ROUNDS))
    times = {name: statistics.median(medians) for name, medians in rounds.items()}
    result = dict(case, density=packed.density, max_error=error, dense_ms=times["dense"] * 1e3)
    result.update({name: t / times["dense"] for name, t in times.items() if name != "dense"})
    result["vs_torch_csr"] = result["torch_csr"] / result["sparsedsl"]
    return result


def warm_up(prog, seconds: float = 1.0) -> None:
    """Run dense and sparse kernels for a while first: thread pools start, clocks settle."""
    x, w = torch.randn(128, 768), torch.randn(768, 768)
    packed = prog.pack("CSR", prune(w, prog.format("CSR"), 0.9))
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        F.linear(x, w)
        prog.linear(x, packed, torch.zeros(768))


def sweep(prog, reps: int, n: int = 3072, k: int = 768, tokens: int = 128) -> dict:
    """Speed-up over dense against sparsity, per format, on one BERT shape."""
    levels = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98]
    curves = {}
    for fmt in tqdm(["CSR", "BSR(4, 1)", "BSR(16, 16)", "ELL(77)"], desc="sweep", leave=False):
        points = []
        for s in levels:
            if fmt.startswith("ELL"):
                continue
            r = measure(prog, {"tokens": tokens, "n": n, "k": k, "fmt": fmt, "sparsity": s}, reps)
            points.append((s, 1 / r["sparsedsl"], 1 / r["torch_csr"]))
        if points:
            curves[fmt] = points
    for fmt in STRUCTURED:
        r = measure(prog, {"tokens": tokens, "n": n, "k": k, "fmt": fmt, "sparsity": None}, reps)
        curves[fmt] = [(1 - r["density"], 1 / r["sparsedsl"], 1 / r["torch_csr"])]
    return curves


def plot(curves: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for fmt, points in curves.items():
        xs, ys, torch_ys = zip(*points)
        style = "o-" if len(xs) > 1 else "s"
        ax.plot(xs, ys, style, label=f"sparsedsl {fmt}")
        if fmt == "CSR":
            ax.plot(xs, torch_ys, "k--", label="torch.sparse CSR")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("sparsity")
    ax.set_ylabel("speed-up over dense F.linear")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="one shape, no sweep")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--decode", action="store_true", help="only the few-token rows, no sweep")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "speedup.png")
    parser.add_argument(
        "--backend",
        choices=("tvm", "llvm"),
        action="append",
        default=None,
        help="add the llvm backend's rows (the tvm backend is always measured)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: the GPU table (gpu.py)")
    parser.add_argument("--formats", help="only the rows of formats starting with one of these (CSR,NM); no sweep")
    parser.add_argument("--tokens", help="only the rows of these token counts (1,128); no sweep")
    args = parser.parse_args()
    if args.device == "cuda":
        from gpu import run

        run(ROOT / "benchmarks" / "results_cuda.json", tokens=4096)
        return
    torch.set_num_threads(args.threads)
    os.environ["SPARSEDSL_NUM_THREADS"] = str(args.threads)
    progs = {b: sd.compile(ROOT / "examples" / "linear.sdsl", backend=b) for b in ["tvm", *(args.backend or [])]}
    warm_up(progs["tvm"])
    table = decode_cases() if args.decode else cases(args.quick)
    if args.formats:
        table = [c for c in table if c["fmt"].startswith(tuple(args.formats.split(",")))]
    if args.tokens:
        table = [c for c in table if c["tokens"] in {int(t) for t in args.tokens.split(",")}]
    rows = [measure(progs, c, args.reps) for c in tqdm(table, desc="kernels")]
    header = (
        f"{'tokens':>6} {'N x K':>11} {'format':<12} {'sparsity':>8} {'limit':>6} {'sparsedsl':>9} "
        f"{'torch CSR':>9} {'torch BSR':>9} {'scipy':>6} {'vs torch':>8} {'max err':>8}"
        + ("  llvm  llvm/tvm" if "llvm" in progs else "")
    )
    print(f"\nratio = time / F.linear time ({args.threads} threads, fp32, {host_cpu()}); lower is better")
    print(header)
    print("-" * len(header))
    for r in rows:
        sparsity = "n:m" if r["sparsity"] is None else f"{r['sparsity']:.0%}"
        bsr = f"{r['torch_bsr']:9.2f}" if "torch_bsr" in r else f"{'-':>9}"
        print(
            f"{r['tokens']:>6} {r['n']:>5}x{r['k']:<5} {r['fmt']:<12} {sparsity:>8} {r['density']:6.2f} "
            f"{r['sparsedsl']:9.2f} {r['torch_csr']:9.2f} {bsr} {r['scipy_csr']:6.2f} "
            f"{r['vs_torch_csr']:7.1f}x {r['max_error']:8.1e}"
            + (f" {r['llvm']:5.2f} {r['llvm'] / r['sparsedsl']:8.2f}" if "llvm" in r else "")
        )
    report = {
        "machine": {
            "cpu": host_cpu(),
            "threads": args.threads,
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "rows": rows,
    }
    if not (args.quick or args.no_sweep or args.decode or args.formats or args.tokens):
        curves = sweep({"tvm": progs["tvm"]}, args.reps)
        plot(curves, args.plot, f"3072x768 weight, 128 tokens, {args.threads} threads ({host_cpu()})")
        report["sweep"] = curves
        print(f"sweep plotted to {args.plot}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
