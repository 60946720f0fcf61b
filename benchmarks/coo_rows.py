"""COO with its rows shared among threads against COO summed by one thread, in one process: the
kernel built with ``schedule.SORTED_PARTS`` parts (the default) and with one part (the code before
sharing, but for its two searches), interleaved with dense ``F.linear`` over several rounds; the
medians of each round's ratios to ``F.linear``.

    python benchmarks/coo_rows.py [--tokens 1,8] [--sparsity 0.9] [--rounds 5] [--backend tvm] [--threads 2]
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from kernels import ROOT, comparison_parser, rule_chosen_threads, warm_up

import sparsedsl as sd
from sparsedsl.ir import schedule
from sparsedsl.runtime.prune import prune
from sparsedsl.timing import median_time

SHAPES = [(4096, 4096), (3072, 768), (4096, 1024)]


def compare(progs: dict[int, sd.Program], weight: torch.Tensor, tokens: int, rounds: int) -> dict[int, float]:
    """Each program's median ratio to ``F.linear`` over ``rounds`` interleaved rounds."""
    gen = torch.Generator().manual_seed(1)
    packed = next(iter(progs.values())).pack("COO", weight)
    x, bias = torch.randn(tokens, weight.shape[1], generator=gen), torch.zeros(weight.shape[0])
    for p in progs.values():
        torch.testing.assert_close(p.linear(x, packed, bias), F.linear(x, weight, bias), rtol=1e-3, atol=1e-3)
    ratios: dict[int, list[float]] = {parts: [] for parts in progs}
    for _ in range(rounds):
        dense = median_time(lambda: F.linear(x, weight, bias), 20, budget=0.2)
        for parts, p in progs.items():
            ratios[parts].append(median_time(lambda p=p: p.linear(x, packed, bias), 20, budget=0.2) / dense)
    return {parts: statistics.median(v) for parts, v in ratios.items()}


def main() -> None:
    parser = comparison_parser(__doc__)
    parser.add_argument("--tokens", default="1,8")
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args()
    rule_chosen_threads(args.threads)
    progs, weights = {}, []
    for parts in (1, schedule.SORTED_PARTS):
        schedule.SORTED_PARTS = parts  # read when the program lowers the kernel for a format
        progs[parts] = p = sd.compile(ROOT / "examples" / "linear.sdsl", backend=args.backend)
        for n, k in SHAPES if not weights else ():
            gen = torch.Generator().manual_seed(0)
            weights.append(prune(torch.randn(n, k, generator=gen) / k**0.5, p.format("COO"), args.sparsity))
        for weight in weights:  # built now, for each weight's index types
            p.kernels["linear"].instance_for(p.pack("COO", weight))
    warm_up(progs[1])
    print(f"{args.backend}, {args.threads} threads, COO {args.sparsity:.0%}: ratio = time / F.linear time")
    print(f"{'tokens':>6} {'N x K':>11} {'one part':>9} {'shared':>9}")
    for weight in weights:
        for tokens in (int(t) for t in args.tokens.split(",")):
            cells = "".join(f" {r:9.3f}" for r in compare(progs, weight, tokens, args.rounds).values())
            print(f"{tokens:>6} {weight.shape[0]:>5}x{weight.shape[1]:<5}{cells}", flush=True)


if __name__ == "__main__":
    main()
