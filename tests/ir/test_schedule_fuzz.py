"""Random schedules on every kernel shape and format, on both CPU backends: ``sd.compile`` refuses
a schedule with a located error, or the kernel builds and gives the dense answer. Never a backend's
internal error at the first call, never any other exception.

``SPARSEDSL_FUZZ_EXAMPLES`` sets the examples per backend (``make fuzz``: 200, random); without it
a few fixed ones run in ``make test``.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import sparsedsl as sd
from sparsedsl.ir.schedule import loops
from sparsedsl.runtime.prune import fixed_density, prune
from tests.strategies import fuzz_examples, schedule_block

SETTINGS = settings(
    max_examples=fuzz_examples(12),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

FORMATS_DECL = """
format VNM = (i, j) -> (i / 4: dense, j / 4: dense, j % 4: nm(2, 4), i % 4: dense)
format BELL(w, b) = (i, j) -> (i: dense, j / b: fixed(w), j % b: dense)
"""
# N and K in SIZES fit every one of these
FORMATS = ["CSR", "CSC", "COO", "BSR(4, 1)", "BSR(2, 2)", "NM(2, 4)", "NM(1, 2)", "ELL(3)", "VNM", "BELL(2, 2)"]
SIZES = {"N": (4, 8), "K": (8, 12), "B": (1, 3)}
TOKENS = (1, 2, 5, 17, 70)

# name -> (signature and statement with the weight's format as {fmt}, dense reference, layouts)
KERNELS = {
    "linear": (
        "(X: f32[M, K], W: f32[N, K] @ {fmt}) -> (Y: f32[M, N]) {{ Y[m, n] = sum(k) X[m, k] * W[n, k] }}",
        lambda a: a["X"] @ a["W"].T,
        [("X", ("m", "k"))],
    ),
    "linear_gelu": (
        "(X: f32[M, K], W: f32[N, K] @ {fmt}, b: f32[N]) -> (Y: f32[M, N]) "
        "{{ Y[m, n] = gelu(sum(k) X[m, k] * W[n, k] + b[n]) }}",
        lambda a: F.gelu(a["X"] @ a["W"].T + a["b"]),
        [("X", ("m", "k"))],
    ),
    "scaled_residual": (
        "(X: f32[M, K], W: f32[N, K] @ {fmt}, alpha: f32, R: f32[M, N]) -> (Y: f32[M, N]) "
        "{{ Y[m, n] = alpha * sum(k) X[m, k] * W[n, k] + R[m, n] }}",
        lambda a: a["alpha"] * (a["X"] @ a["W"].T) + a["R"],
        [("X", ("m", "k")), ("R", ("m", "n"))],
    ),
    "linear_t": (
        "(G: f32[M, N], W: f32[N, K] @ {fmt}) -> (Y: f32[M, K]) {{ Y[m, k] = sum(n) G[m, n] * W[n, k] }}",
        lambda a: a["G"] @ a["W"],
        [("G", ("m", "n"))],
    ),
    "spmv": (
        "(W: f32[N, K] @ {fmt}, x: f32[K], b: f32[N]) -> (y: f32[N]) {{ y[n] = relu(sum(k) W[n, k] * x[k] + b[n]) }}",
        lambda a: F.relu(a["W"] @ a["x"] + a["b"]),
        [],
    ),
    "spmv_t": (
        "(W: f32[N, K] @ {fmt}, x: f32[N]) -> (y: f32[K]) {{ y[k] = sum(n) W[n, k] * x[n] }}",
        lambda a: a["W"].T @ a["x"],
        [],
    ),
    "batched": (
        "(X: f32[B, M, K], W: f32[N, K] @ {fmt}) -> (Y: f32[B, M, N]) {{ Y[b, m, n] = sum(k) X[b, m, k] * W[n, k] }}",
        lambda a: a["X"] @ a["W"].T,
        [("X", ("b", "m", "k"))],
    ),
    "dense": (  # no sparse input: the format is not used
        "(X: f32[M, K], V: f32[N, K]) -> (Y: f32[M, N]) {{ Y[m, n] = silu(sum(k) X[m, k] * V[n, k]) }}",
        lambda a: F.silu(a["X"] @ a["V"].T),
        [("X", ("m", "k")), ("V", ("n", "k"))],
    ),
    "sddmm": (
        "(A: f32[M, N], B: f32[M, K], S: f32[N, K] @ {fmt}) -> (D: f32[N, K] @ S) "
        "{{ D[n, k] = sum(m) A[m, n] * B[m, k] }}",
        lambda a: (a["A"].T @ a["B"]) * (a["S"] != 0),
        [("A", ("m", "n")), ("B", ("m", "k"))],
    ),
}


def _source(kernel: str, fmt: str) -> str:
    return f"{FORMATS_DECL}kernel {kernel}{KERNELS[kernel][0].format(fmt=fmt)}\n"


@functools.cache
def _loops(kernel: str, fmt: str) -> tuple[list[str], str | None]:
    """The loop names of the kernel's default variants for ``fmt``, and its token index."""
    compiled = sd.compile(_source(kernel, fmt)).kernels[kernel]
    variants = compiled.lowered(None)
    names = sorted({f.var.name for v in variants.values() for f in loops(v.body)})
    return names, next(iter(variants.values())).meta.get("token")


def _arguments(prog: sd.Program, kernel: str, fmt: str, sizes: dict[str, int], seed: int):
    """Random call arguments, and the dense tensors of the same values by parameter name."""
    gen = torch.Generator().manual_seed(seed)
    args, dense = [], {}
    for p in prog.kernels[kernel].kernel.inputs:
        if p.shape is None:
            dense[p.name] = 0.75
            args.append(0.75)
        elif p.sparse:
            sparsity = None if fixed_density(prog.format(fmt)) else 0.5
            weight = prune(torch.randn(sizes["N"], sizes["K"], generator=gen), prog.format(fmt), sparsity)
            dense[p.name] = weight
            args.append(prog.pack(fmt, weight))
        else:
            dense[p.name] = torch.randn(*[sizes[d] for d in p.shape], generator=gen)
            args.append(dense[p.name])
    return args, dense


def _check(kernel: str, fmt: str, backend: str, data) -> None:
    names, token = _loops(kernel, fmt)
    summed = tuple(re.findall(r"sum\((\w+)\)", KERNELS[kernel][0]))
    schedule = data.draw(schedule_block(kernel, names, token, KERNELS[kernel][2], summed), label="schedule")
    try:
        prog = sd.compile(_source(kernel, fmt) + schedule, backend=backend)
    except (sd.ScheduleError, sd.SdslSemanticError) as err:
        assert err.span is not None and err.render().startswith("<string>:"), err.render()
        event("refused")
        return
    event("built")
    for m in data.draw(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=2, unique=True), label="tokens"):
        sizes = {"M": m, **{d: data.draw(st.sampled_from(v), label=d) for d, v in SIZES.items()}}
        args, dense = _arguments(prog, kernel, fmt, sizes, seed=m)
        out = prog.kernels[kernel](*args)
        actual = out.to_dense() if isinstance(out, sd.SparseTensor) else out
        torch.testing.assert_close(actual, KERNELS[kernel][1](dense), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["tvm", "llvm"])
@SETTINGS
@given(kernel=st.sampled_from(sorted(KERNELS)), fmt=st.sampled_from(FORMATS), data=st.data())
def test_schedule_fuzz(backend, kernel, fmt, data):
    _check(kernel, fmt, backend, data)
