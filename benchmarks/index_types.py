"""Narrow index buffers against int32 ones, in one process: each row of ``kernels.py`` runs its
kernel on the packed weight (coordinates in the narrowest type their level allows) and on the same
weight with every index buffer widened to int32 (the kernel built for those: the code before
narrow buffers), interleaved with dense ``F.linear`` over several rounds; the medians of each
round's ratios. Interleaving in one process is what makes a few-percent difference visible on
these shared machines, where two runs of the whole table differ by more.

    python benchmarks/index_types.py [--formats CSR,NM] [--tokens 1,128] [--rounds 7] [--backend llvm]
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.nn.functional as F
from kernels import ROOT, cases, warm_up

import sparsedsl as sd
from sparsedsl.runtime.prune import prune
from sparsedsl.timing import median_time


def widened(weight: sd.SparseTensor) -> sd.SparseTensor:
    """The same structure with int32 index buffers (trusted: they are the packer's, widened)."""
    buffers = {k: v if k == "vals" else v.to(torch.int32) for k, v in weight.buffers.items()}
    return sd.SparseTensor(weight.format, weight.shape, buffers, validate=False)


def compare(prog: sd.Program, case: dict, rounds: int) -> dict:
    """Ratios to dense of the kernel on int32 and on narrow buffers, and narrow / int32."""
    gen = torch.Generator().manual_seed(0)
    fmt = prog.format(case["fmt"])
    weight = prune(torch.randn(case["n"], case["k"], generator=gen) / case["k"] ** 0.5, fmt, case["sparsity"])
    narrow = prog.pack(fmt, weight)
    wide = widened(narrow)
    x, bias = torch.randn(case["tokens"], case["k"], generator=gen), torch.zeros(case["n"])
    for w in (narrow, wide):
        torch.testing.assert_close(prog.linear(x, w, bias), F.linear(x, weight, bias), rtol=1e-3, atol=1e-3)
    ratios: dict[str, list[float]] = {"int32": [], "narrow": []}
    for _ in range(rounds):
        dense = median_time(lambda: F.linear(x, weight, bias), 10, budget=0.1)
        for name, w in (("int32", wide), ("narrow", narrow)):
            ratios[name].append(median_time(lambda w=w: prog.linear(x, w, bias), 10, budget=0.1) / dense)
    gain = statistics.median(n / i for n, i in zip(ratios["narrow"], ratios["int32"]))
    types = "/".join(str(b.dtype).removeprefix("torch.") for b in narrow.structure())
    return {name: statistics.median(v) for name, v in ratios.items()} | {"narrow/int32": gain, "types": types}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="CSR,NM", help="rows of formats starting with these")
    parser.add_argument("--tokens", default="1,128", help="rows of these token counts")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--backend", choices=("tvm", "llvm"), action="append", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    os.environ["SPARSEDSL_NUM_THREADS"] = "2"
    progs = {b: sd.compile(ROOT / "examples" / "linear.sdsl", backend=b) for b in args.backend or ["tvm", "llvm"]}
    warm_up(progs.get("tvm") or next(iter(progs.values())))
    tokens = {int(t) for t in args.tokens.split(",")}
    table = [
        c
        for c in cases(False)  # the decoding rows included
        if c["tokens"] in tokens and c["fmt"].startswith(tuple(args.formats.split(",")))
    ]
    print("ratio = time / F.linear time; narrow/int32 < 1: the narrow buffers are faster")
    print(
        f"{'tokens':>6} {'N x K':>11} {'format':<12} {'index types':<14}"
        + "".join(f" {b + ' int32':>10} {b + ' narrow':>11} {'gain':>6}" for b in progs)
    )
    for case in table:
        cells = ""
        for prog in progs.values():
            r = compare(prog, case, args.rounds)
            cells += f" {r['int32']:10.3f} {r['narrow']:11.3f} {r['narrow/int32']:6.2f}"
        label = case["fmt"] + (f" {case['sparsity']:.0%}" if case["sparsity"] else "")
        print(f"{case['tokens']:>6} {case['n']:>5}x{case['k']:<5} {label:<12} {r['types']:<14}{cells}", flush=True)


if __name__ == "__main__":
    main()
