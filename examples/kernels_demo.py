"""Compile examples/linear.sdsl and run its kernels on BERT-sized layers (part of `make demo`).

For each layer shape and format, the weight is pruned to the format (magnitude), packed, and the
fused linear kernel is compared with dense ``F.linear`` on the pruned weight: max abs error and
time ratio (sparsedsl / dense, same process, same thread count; lower is better).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sparsedsl as sd
from sparsedsl.runtime.prune import prune
from sparsedsl.timing import median_time

LAYERS = [(768, 768), (3072, 768), (768, 3072)]  # (out features N, in features K)
FORMATS = [("CSR", 0.9), ("BSR(4, 1)", 0.9), ("NM(2, 4)", None), ("NM(1, 4)", None)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    source = Path(__file__).with_name("linear.sdsl")
    start = time.perf_counter()
    prog = sd.compile(source)
    print(f"compiled {source.name}: kernels {', '.join(prog.kernels)}")
    print(f"{args.tokens} tokens, {args.threads} threads, fp32; ratio = sparsedsl time / F.linear time\n")
    header = (
        f"{'layer (N x K)':<14} {'format':<10} {'density':>7} {'max err':>9} {'dense ms':>9} {'sparse ms':>9} "
        f"{'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for n, k in LAYERS:
        x = torch.randn(args.tokens, k)
        bias = torch.randn(n)
        weight = torch.randn(n, k) / k**0.5
        for fmt, sparsity in FORMATS:
            pruned = prune(weight, prog.format(fmt), sparsity)
            packed = prog.pack(fmt, pruned)
            out = prog.linear(x, packed, bias)
            err = (out - F.linear(x, pruned, bias)).abs().max().item()
            dense = median_time(lambda x=x, w=pruned, b=bias: F.linear(x, w, b), args.reps)
            sparse = median_time(lambda x=x, w=packed, b=bias: prog.linear(x, w, b), args.reps)
            print(
                f"{f'{n} x {k}':<14} {fmt:<10} {packed.density:>7.3f} {err:>9.1e} {dense * 1e3:>9.3f} "
                f"{sparse * 1e3:>9.3f} {sparse / dense:>6.2f}"
            )
    print(f"\ntotal {time.perf_counter() - start:.1f} s (kernels compile on first use, per format)")


if __name__ == "__main__":
    main()
