"""A scatter over sorted rows (COO) shared among threads (``schedule.share_sorted``): parts that
start at row boundaries found by binary search, against dense torch on both CPU backends at
several thread counts, and the rewrite's refusals."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsedsl as sd
from sparsedsl.ir import loop_ir as L
from sparsedsl.ir import schedule as sched
from tests.kernels.test_differential import HERE
from tests.strategies import prune_to_fit


@pytest.fixture(scope="module", params=["tvm", "llvm"])
def prog(request):
    return sd.compile(HERE / "epilogues.sdsl", backend=request.param)


@st.composite
def coo_case(draw):
    """Shapes from one row to many, sparsities up to nearly empty, a few tokens or one."""
    n, k = draw(st.integers(1, 80)), draw(st.integers(1, 40))
    m = draw(st.one_of(st.just(1), st.integers(1, 40)))
    return n, k, m, draw(st.floats(0.0, 0.99)), draw(st.integers(0, 2**31 - 1)), draw(st.integers(1, 3))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=coo_case())
def test_coo_rows_shared_among_threads_match_dense(prog, case):
    n, k, m, sparsity, seed, threads = case
    gen = torch.Generator().manual_seed(seed)
    w = prune_to_fit(torch.randn(n, k, generator=gen), prog.format("COO"), sparsity)
    W = prog.pack("COO", w)
    x, v, b = torch.randn(m, k, generator=gen), torch.randn(k, generator=gen), torch.randn(n, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.testing.assert_close(prog.bias_relu(x, W, b), F.relu(x @ w.T + b), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(prog.matvec(W, v, b), F.relu(w @ v + b), rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(before)


def _coo_variants() -> dict[str, L.LoopFunc]:
    return sd.compile(HERE / "epilogues.sdsl").kernels["bias_relu"].lowered(sd.compile("").format("COO"))


def test_the_rows_variants_share_coo_rows_and_the_tiles_variant_does_not():
    parts = f"for n_p in [0, {sched.SORTED_PARTS}) parallel:"
    shared = {name for name, f in _coo_variants().items() if parts in L.func_str(f)}
    assert shared == {"rows", "rows_small", "rows_one"}


@pytest.mark.parametrize(
    "variant, row, message",
    [
        ("rows", "n_c", "loop 'n_p' around or inside it is already parallel"),
        (None, "k_c", "does not open with the row 'let k_c'"),  # None: the tiles variant, made serial
    ],
)
def test_illegal_shares_are_refused(variant, row, message):
    variants = _coo_variants()
    func = variants[variant] if variant else replace(variants["tiles"], body=_serial(variants["tiles"].body))
    with pytest.raises(sd.ScheduleError, match=message):
        sched.share_sorted(func, "n", row, 4)


def _serial(body: L.Stmt) -> L.Stmt:
    return sched.rewrite_loops(
        body, lambda f: replace(f, kind=L.LoopKind.SERIAL) if f.kind is L.LoopKind.PARALLEL else None
    )


def test_stores_not_indexed_by_the_row_are_refused():
    func = _coo_variants()["tiles"]
    func = replace(func, body=_serial(func.body))
    body = sched.rewrite_stores(
        func.body,
        lambda st: L.Store(st.buffer, (L.const(0), *st.indices[1:]), st.value) if st.buffer.name == "acc" else st,
    )
    with pytest.raises(sd.ScheduleError, match="writes 'acc' at places not indexed by the row 'n_c'"):
        sched.share_sorted(replace(func, body=body), "n", "n_c", 4)
