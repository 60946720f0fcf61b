"""What calling a kernel costs beyond its work (issue 14, "one thread pool"): a 16 x 16 CSR weight
and one token, so the time is the call itself. Per call, in µs, through ``prog.linear`` and through
``SparseLinear``, on both CPU backends, against ``F.linear`` on the same shapes in the same process;
then ``F.linear`` on a 2 x 40 input and a 128 x 384 residual add timed right after a kernel call
(torch's own ops must not slow down once sparsedsl's kernels have run).

    python benchmarks/overhead.py [--threads 2] [--out benchmarks/overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sparsedsl as sd

ROOT = Path(__file__).resolve().parents[1]
CALLS = 4000


def per_call_us(fn, calls: int = CALLS, repeats: int = 5) -> float:
    """The best of ``repeats`` runs of ``calls`` back-to-back calls, in µs a call."""
    for _ in range(calls // 10):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def interleaved_us(op, kernel, calls: int = CALLS // 4) -> float:
    """µs a call of ``op`` when every call follows a kernel call (the kernel's time taken out)."""
    both = per_call_us(lambda: (kernel(), op()), calls)
    return both - per_call_us(kernel, calls)


def backend_rows(
    backend: str, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, ops: dict
) -> dict[str, float]:
    """One backend's rows: the kernel called directly and through a module, and torch's small ops
    ``ops`` (those of the rows without a kernel) right after it."""
    prog = sd.compile(ROOT / "examples" / "linear.sdsl", backend=backend)
    packed = prog.pack("CSR", weight)
    layer = sd.SparseLinear(packed, bias, prog, kernel="linear")

    def kernel():
        return prog.linear(x, packed, bias)

    with torch.inference_mode():
        return {
            f"{backend}: prog.linear": per_call_us(kernel),
            f"{backend}: SparseLinear": per_call_us(lambda: layer(x)),
            **{f"{backend}: {name} after a kernel": interleaved_us(op, kernel) for name, op in ops.items()},
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["SPARSEDSL_NUM_THREADS"] = str(args.threads)
    torch.manual_seed(0)
    weight = torch.randn(16, 16) * (torch.rand(16, 16) < 0.5)
    bias, x = torch.randn(16), torch.randn(1, 16)
    small, lw, hidden = torch.randn(2, 40), torch.randn(40, 40), torch.randn(128, 384)
    ops = {"F.linear 2x40": lambda: F.linear(small, lw), "add 128x384": lambda: hidden + hidden}
    rows = {"F.linear 16x16, 1 token": per_call_us(lambda: F.linear(x, weight, bias))}
    rows |= {name: per_call_us(op) for name, op in ops.items()}
    for backend in ("tvm", "llvm"):
        rows |= backend_rows(backend, weight, bias, x, ops)
    print(f"{args.threads} threads, µs a call (best of 5 x {CALLS})")
    for name, us in rows.items():
        print(f"  {name:<40} {us:8.1f}")
    Path(args.out).write_text(json.dumps({"threads": args.threads, "us": rows}, indent=1))


if __name__ == "__main__":
    main()
