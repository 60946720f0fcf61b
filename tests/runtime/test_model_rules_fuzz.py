"""Random model-rule files against a small module tree: each is refused with a located error, or an
error naming its rule or layer, or compiles to a model that computes what its pruned dense twin
computes; never another exception. ``SPARSEDSL_FUZZ_EXAMPLES`` sets the number of files
(``make fuzz``, random, both backends); without it ``make test`` runs a few fixed ones on the llvm
backend, the faster to build."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import sparsedsl as sd
from tests.strategies import fuzz_examples

BACKENDS = ["llvm", "tvm"] if os.environ.get("SPARSEDSL_FUZZ_EXAMPLES") else ["llvm"]

KERNELS = """
kernel lin(X: f32[M, K], W: f32[N, K] @ CSR, b: f32[N]) -> (Y: f32[M, N]) { Y[m, n] = sum(k) X[m, k] * W[n, k] + b[n] }
kernel lin_gelu(X: f32[M, K], W: f32[N, K] @ BSR(4, 1), b: f32[N]) -> (Y: f32[M, N]) {
    Y[m, n] = gelu(sum(k) X[m, k] * W[n, k] + b[n])
}
kernel lin_relu(X: f32[M, K], W: f32[N, K] @ CSR, b: f32[N]) -> (Y: f32[M, N]) {
    Y[m, n] = relu(sum(k) X[m, k] * W[n, k] + b[n])
}
kernel plain(X: f32[M, K], W: f32[N, K]) -> (Y: f32[M, N]) { Y[m, n] = sum(k) X[m, k] * W[n, k] }
kernel nobias(X: f32[M, K], W: f32[N, K] @ NM(2, 4)) -> (Y: f32[M, N]) { Y[m, n] = sum(k) X[m, k] * W[n, k] }
kernel flipped(X: f32[M, K], W: f32[K, N] @ CSR) -> (Y: f32[M, N]) { Y[m, n] = sum(k) X[m, k] * W[k, n] }
"""
# (usual choices, unusual ones): three rules in four draw from the usual ones only.
GLOBS = (["*", "*.dense", "0.dense", "0.out", "1", "3", "*.out", "[13]"], ["nothing", "0.act", "2", "?", "0.*"])
USES = (  # a kernel and the module it fuses
    [("lin", None), ("nobias", None), ("lin_gelu", "*.act"), ("lin_relu", "2")],
    [("lin_gelu", None), ("lin_relu", "*.act"), ("lin", "2"), ("plain", None), ("flipped", None), ("missing", None)]
    + [("lin_gelu", "1"), ("lin_gelu", "*"), ("lin_relu", "*.norm")],
)
FORMATS = ([None, "CSR", "COO", "CSC", "BSR(4, 1)", "BSR(4, 4)", "NM(2, 4)"], ["NM(1, 4)", "ELL(2)", "BSR(3, 1)", "X"])
SPARSITIES = ([None, "0.5", "0.75", "0.9"], ["0", "0.25", "1.5", "0.875"])


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense, self.act, self.out, self.norm = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8), nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.out(self.act(self.dense(x))) + x)


def model() -> nn.Module:
    """Layers nested in a block and at the top of a Sequential, with activations to fuse."""
    torch.manual_seed(0)
    return nn.Sequential(Block(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()


@st.composite
def rule_file(draw) -> str:
    """A ``model`` block of one to three random rules, sometimes with a character dropped or added."""
    rules = []
    for _ in range(draw(st.integers(1, 3))):
        wild = draw(st.integers(0, 3)) == 0
        glob, (kernel, fuse), fmt, sparsity = (
            draw(st.sampled_from(usual + unusual * wild)) for usual, unusual in (GLOBS, USES, FORMATS, SPARSITIES)
        )
        rule = f'linear "{glob}" use {kernel}' + f" with {fmt}" * (fmt is not None)
        rules.append(rule + f" sparsity {sparsity}" * (sparsity is not None) + f' fuse "{fuse}"' * (fuse is not None))
    text = KERNELS + "model m {\n    " + "\n    ".join(rules) + "\n}\n"
    if draw(st.integers(0, 7)) == 0:
        at = draw(st.integers(len(KERNELS), len(text) - 1))
        text = text[:at] + draw(st.sampled_from(["", "{", '"', "0", " "])) + text[at + 1 :]
    return text


def make_dense(compiled: nn.Module) -> nn.Module:
    """Replace, in place, every sparse layer by its dense twin (its fused module included)."""
    for name, module in list(compiled.named_modules()):
        if isinstance(module, sd.SparseLinear):
            parent, _, child = name.rpartition(".")
            setattr(compiled.get_submodule(parent), child, module.to_dense())
    return compiled


@settings(
    max_examples=fuzz_examples(8),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(text=rule_file(), backend=st.sampled_from(BACKENDS))
def test_random_rule_files_are_refused_clearly_or_compile_right(text, backend):
    try:
        compiled = sd.compile_model(model(), text, backend=backend)
    except sd.SdslError as err:
        located = err.span is not None and err.source is not None
        assert located or err.message.startswith(("layer '", 'rule "')), err.render()
        event(f"refused: {type(err).__name__}")
        return
    event("compiled")
    x = torch.randn(3, 8)
    with torch.no_grad():
        actual = compiled(x)
        torch.testing.assert_close(actual, make_dense(compiled)(x), rtol=1e-4, atol=1e-5)
