"""What a small layer's transposing copies cost (issue 14, item 6): for MiniLM's linear shapes, the
time of a 90% BSR(4, 1) kernel and of the same kernel on a weight with no stored block (only the
activations' staging, the accumulators' zeroing and the result's write-out are left), as ratios to
``F.linear`` in the same process, alternated, with ``x.t().contiguous()`` (torch's transpose of
the input) for scale.

    python benchmarks/transposes.py [--threads 1] [--cpu-time] [--out benchmarks/transposes.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sparsedsl as sd

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(384, 384, 1024), (384, 384, 128), (1536, 384, 128), (384, 1536, 128)]  # N, K, tokens


def quartile_s(fn, clock, calls: int) -> float:
    """The lower quartile of ``calls`` timed calls (after 3 untimed), in seconds."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        start = clock()
        fn()
        times.append(clock() - start)
    return sorted(times)[len(times) // 4]


def ratios(prog, n: int, k: int, m: int, gen: torch.Generator, clock, args: argparse.Namespace) -> dict[str, float]:
    """The best over alternated rounds of each run's time over ``F.linear``'s, for one shape."""
    fmt = prog.format("BSR(4, 1)")
    weight = sd.prune(torch.randn(n, k, generator=gen), fmt, 0.9)
    packed, empty = prog.pack(fmt, weight), prog.pack(fmt, torch.zeros(n, k))
    x, bias = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen)
    runs = {
        "dense": lambda: F.linear(x, weight, bias),
        "sparse": lambda: prog.linear(x, packed, bias),
        "no block": lambda: prog.linear(x, empty, bias),
        "x.t()": lambda: x.t().contiguous(),
    }
    best: dict[str, float] = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            times = {name: quartile_s(fn, clock, args.calls) for name, fn in runs.items()}
            for name in ("sparse", "no block", "x.t()"):
                best[name] = min(best.get(name, float("inf")), times[name] / times["dense"])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cpu-time", action="store_true", help="time.thread_time (1 thread) instead of wall time")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--backend", default="tvm", choices=["tvm", "llvm"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "transposes.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    prog = sd.compile(ROOT / "examples" / "linear.sdsl", backend=args.backend)
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"{args.threads} thread(s), {args.backend}, ratio to F.linear (lower quartile of {args.calls} calls,")
    print(f"best of {args.rounds} alternated rounds)")
    print(f"{'N x K':>10} {'tokens':>6} {'90% BSR(4,1)':>13} {'no block':>9} {'x.t()':>7}")
    for n, k, m in SHAPES:
        best = ratios(prog, n, k, m, gen, clock, args)
        rows.append({"n": n, "k": k, "tokens": m, **best})
        print(f"{n:>4} x {k:<4} {m:>6} {best['sparse']:>13.3f} {best['no block']:>9.3f} {best['x.t()']:>7.3f}")
    Path(args.out).write_text(json.dumps({"threads": args.threads, "backend": args.backend, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
