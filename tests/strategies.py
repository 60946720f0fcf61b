"""Shared hypothesis strategies: formats, shapes that fit them, sparsities."""

from __future__ import annotations

import os

import torch
from hypothesis import strategies as st

from sparsedsl.ir.formats import Format
from sparsedsl.runtime.prune import fixed_density, prune

# Every prelude format the foundation promises, and the user-defined vector-wise N:M of
# examples/linear.sdsl: (format text, row multiple, column multiple).
FORMATS = [
    ("CSR", 1, 1),
    ("CSC", 1, 1),
    ("COO", 1, 1),
    ("BSR(4, 1)", 4, 1),
    ("BSR(16, 16)", 16, 16),
    ("BSR(8, 4)", 8, 4),
    ("NM(2, 4)", 1, 4),
    ("NM(1, 4)", 1, 4),
    ("NM(2, 8)", 1, 8),
    ("ELL(3)", 1, 4),
    ("VNM", 4, 4),
]

def fuzz_examples(fixed: int) -> int:
    """Examples per fuzz test: ``fixed`` in ``make test``, ``SPARSEDSL_FUZZ_EXAMPLES`` in ``make fuzz``."""
    return int(os.environ.get("SPARSEDSL_FUZZ_EXAMPLES") or fixed)


def prune_to_fit(weight: torch.Tensor, fmt: Format, sparsity: float | None) -> torch.Tensor:
    """``weight`` pruned to fit ``fmt``, to ``sparsity`` where the format takes one (a format of
    fixed density, N:M or ELL, takes none: it gives its own)."""
    return prune(weight, fmt, None if fixed_density(fmt) else sparsity)


@st.composite
def sparse_case(draw, formats=FORMATS):
    """(format text, N, K, M, sparsity or None, seed) with N and K fitting the format's blocks."""
    fmt, rows, cols = draw(st.sampled_from(formats))
    n = rows * draw(st.integers(1, max(1, 48 // rows)))
    k = cols * draw(st.integers(1, max(1, 64 // cols)))
    m = draw(st.one_of(st.just(1), st.integers(1, 70)))
    sparsity = draw(st.floats(0.0, 0.99))  # prune_to_fit asks none of a format of fixed density
    seed = draw(st.integers(0, 2**31 - 1))
    return fmt, n, k, m, sparsity, seed


# ---- random schedules ---------------------------------------------------------------------------

LOOP_VERBS = ("split", "reorder", "parallel", "vectorize", "unroll")
SPLIT_FACTORS = (1, 2, 3, 4, 8, 16, 100)
TILES = (1, 3, 8, 16, 64)
BLOCKS = (1, 2, 4, 6, 64)  # ``block`` sizes: legal or not for a format's divisor


@st.composite
def schedule_block(
    draw, kernel: str, loops: list[str], token: str | None = None, layouts=(), summed: tuple[str, ...] = ()
) -> str:
    """A random ``schedule KERNEL on cpu { ... }``: maybe a ``tile`` of the token index, maybe a
    ``block`` of a summed index (``summed``) or of the token, maybe a
    ``layout`` (``layouts``: (tensor, its indices) pairs, any order drawn), then up to six loop
    directives over the loop names ``loops``, the names that earlier splits made, and one name no
    loop has. Legal or not: the compiler must either refuse it, located, or run it correctly."""
    directives = []
    if token is not None and draw(st.booleans()):
        directives.append(f"tile {token} by {draw(st.sampled_from(TILES))}")
    if summed and draw(st.booleans()):
        index = draw(st.sampled_from([*summed, *([token] if token else [])]))
        directives.append(f"block {index} by {draw(st.sampled_from(BLOCKS))}")
    if layouts and draw(st.booleans()):
        tensor, indices = draw(st.sampled_from(list(layouts)))
        directives.append(f"layout {tensor} as [{', '.join(draw(st.permutations(indices)))}]")
    names = [*loops, "nope"]
    for step in range(draw(st.integers(0, 6))):
        verb = draw(st.sampled_from(LOOP_VERBS))
        if verb == "split":
            loop = draw(st.sampled_from(names))
            outer, inner = f"{loop}_a{step}", f"{loop}_b{step}"
            directives.append(f"split {loop} by {draw(st.sampled_from(SPLIT_FACTORS))} into {outer}, {inner}")
            names += [outer, inner]
        elif verb == "reorder":
            chosen = draw(st.lists(st.sampled_from(names), min_size=2, max_size=3, unique=True))
            directives.append(f"reorder {', '.join(chosen)}")
        else:
            directives.append(f"{verb} {draw(st.sampled_from(names))}")
    return f"schedule {kernel} on cpu {{\n    " + "\n    ".join(directives) + "\n}"
