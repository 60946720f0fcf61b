"""Shared hypothesis strategies: formats, shapes that fit them, sparsities."""

from __future__ import annotations

from hypothesis import strategies as st

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


@st.composite
def sparse_case(draw, formats=FORMATS):
    """(format text, N, K, M, sparsity, seed) with N and K fitting the format's blocks."""
    fmt, rows, cols = draw(st.sampled_from(formats))
    n = rows * draw(st.integers(1, max(1, 48 // rows)))
    k = cols * draw(st.integers(1, max(1, 64 // cols)))
    m = draw(st.one_of(st.just(1), st.integers(1, 70)))
    sparsity = draw(st.floats(0.0, 0.99))
    seed = draw(st.integers(0, 2**31 - 1))
    return fmt, n, k, m, sparsity, seed
