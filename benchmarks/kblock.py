"""K-blocking against the unblocked sum, in one process: each case's kernel compiled with the
default blocks (``variants.L1_BLOCK_BYTES`` of staged activations a block, or the sizes given) and
with one block spanning the whole sum (the code before K-blocking, but for that block's loop of
one iteration), interleaved with dense
``F.linear`` over several rounds; the medians of each round's ratios to ``F.linear``.

    python benchmarks/kblock.py [--formats "NM(2, 4);VNM"] [--tokens 64,128,512] [--shapes bert,gpt2]
                                [--bytes 16384,32768] [--rounds 5] [--backend llvm] [--threads 2]
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from kernels import ROOT, comparison_parser, rule_chosen_threads, warm_up

import sparsedsl as sd
from sparsedsl.ir import variants
from sparsedsl.runtime.prune import prune
from sparsedsl.timing import median_time

SHAPES = {"bert": [(3072, 768), (768, 3072)], "gpt2": [(4096, 1024), (1024, 4096)], "square": [(768, 768)]}
UNBLOCKED = 1 << 40  # bytes a block: one block holds any sum


def programs(backend: str, sizes: list[int]) -> dict[int, sd.Program]:
    """A program per block size in bytes; each builds its kernels with that size on first use."""
    return {size: sd.compile(ROOT / "examples" / "linear.sdsl", backend=backend) for size in sizes}


def call(prog: sd.Program, size: int, *args) -> torch.Tensor:
    variants.L1_BLOCK_BYTES = size  # read when the program first builds the kernel for a format
    return prog.linear(*args)


def compare(progs: dict[int, sd.Program], fmt: str, n: int, k: int, tokens: int, rounds: int) -> dict[int, float]:
    """Each block size's median ratio to ``F.linear`` over ``rounds`` interleaved rounds."""
    gen = torch.Generator().manual_seed(0)
    prog = next(iter(progs.values()))
    sparsity = None if fmt.startswith(("NM", "VNM")) else 0.9
    weight = prune(torch.randn(n, k, generator=gen) / k**0.5, prog.format(fmt), sparsity)
    packed = prog.pack(fmt, weight)
    x, bias = torch.randn(tokens, k, generator=gen), torch.zeros(n)
    expected = F.linear(x, weight, bias)
    for size, p in progs.items():
        torch.testing.assert_close(call(p, size, x, packed, bias), expected, rtol=1e-3, atol=1e-3)
    ratios: dict[int, list[float]] = {size: [] for size in progs}
    for _ in range(rounds):
        dense = median_time(lambda: F.linear(x, weight, bias), 10, budget=0.2)
        for size, p in progs.items():
            took = median_time(lambda p=p, size=size: call(p, size, x, packed, bias), 10, budget=0.2)
            ratios[size].append(took / dense)
    return {size: statistics.median(v) for size, v in ratios.items()}


def main() -> None:
    parser = comparison_parser(__doc__)
    parser.add_argument("--formats", default="NM(2, 4);NM(1, 4);NM(2, 8);VNM", help="';'-separated")
    parser.add_argument("--tokens", default="64,128,512")
    parser.add_argument("--shapes", default="bert,gpt2", help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--bytes", default=str(variants.L1_BLOCK_BYTES), help="block sizes to compare, in bytes")
    args = parser.parse_args()
    rule_chosen_threads(args.threads)
    sizes = [UNBLOCKED, *(int(b) for b in args.bytes.split(","))]
    progs = programs(args.backend, sizes)
    warm_up(progs[UNBLOCKED])
    print(f"{args.backend}, {args.threads} threads: ratio = time / F.linear time (median of {args.rounds} rounds)")
    print(f"{'tokens':>6} {'N x K':>11} {'format':<10} {'unblocked':>10}" + "".join(f" {s:>10}" for s in sizes[1:]))
    for fmt in args.formats.split(";"):
        for shape in args.shapes.split(","):
            for n, k in SHAPES[shape]:
                for tokens in (int(t) for t in args.tokens.split(",")):
                    r = compare(progs, fmt, n, k, tokens, args.rounds)
                    cells = "".join(f" {r[s]:10.3f}" for s in sizes)
                    print(f"{tokens:>6} {n:>5}x{k:<5} {fmt:<10}{cells}", flush=True)


if __name__ == "__main__":
    main()
