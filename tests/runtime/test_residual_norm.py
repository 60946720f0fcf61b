"""compile_model fusing a layer with the residual add and layer norm after it (BERT's
``BertOutput``): the parent module becomes an ``sd.ResidualNorm`` running one row-wise kernel."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparsedsl as sd

RULES = """
kernel linear_ln(X: f32[M, K], W: f32[N, K] @ CSR, b: f32[N], R: f32[M, N],
                 gamma: f32[N], beta: f32[N], eps: f32) -> (Y: f32[M, N]) {
    let H[m, n] = sum(k) X[m, k] * W[n, k] + b[n] + R[m, n]
    let mean[m] = (sum(n) H[m, n]) / N
    let var[m] = (sum(n) (H[m, n] - mean[m]) * (H[m, n] - mean[m])) / N
    Y[m, n] = (H[m, n] - mean[m]) / sqrt(var[m] + eps) * gamma[n] + beta[n]
}
model m {
    linear "output.dense" use linear_ln with BSR(4, 1) sparsity 0.8 fuse "*.LayerNorm"
}
"""


class Output(nn.Module):
    """BERT's BertOutput: dense -> dropout -> + residual -> LayerNorm."""

    def __init__(self, k: int, n: int):
        super().__init__()
        self.dense = nn.Linear(k, n)
        self.dropout = nn.Dropout(0.1)
        self.LayerNorm = nn.LayerNorm(n, eps=1e-12)

    def forward(self, hidden, residual):
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class NormFirst(Output):
    """The residual added after the norm: not what the kernel computes."""

    def forward(self, hidden, residual):
        return self.LayerNorm(self.dense(hidden)) + residual


class Block(nn.Module):
    def __init__(self, output: type[Output] = Output, n: int = 48, k: int = 96):
        super().__init__()
        self.up = nn.Linear(n, k)
        self.output = output(k, n)
        with torch.no_grad():
            self.output.LayerNorm.weight.uniform_(0.5, 1.5)
            self.output.LayerNorm.bias.normal_()

    def forward(self, x):
        return self.output(torch.relu(self.up(x)), x)


@pytest.mark.parametrize("backend", ["tvm", "llvm"])
def test_fused_residual_norm_matches_the_pruned_dense_model(backend):
    torch.manual_seed(0)
    model = Block().eval()
    sparse = sd.compile_model(model, RULES, backend=backend)
    assert isinstance(sparse.output, sd.ResidualNorm) and isinstance(sparse.output.dense, sd.SparseLinear)
    assert not sparse.output.training  # the parent's mode: dropout stays off in an eval model
    (row,) = sd.report(sparse)
    assert row.kernel == "linear_ln" and row.note == "fuses output.LayerNorm + residual"
    reference = copy.deepcopy(model)
    reference.output.dense = sparse.output.dense.to_dense()
    x = torch.randn(3, 37, 48)
    with torch.inference_mode():
        torch.testing.assert_close(sparse(x), reference(x), rtol=1e-4, atol=1e-4)
    assert {k for k in sparse.state_dict() if not k.startswith("output.dense")} == {
        k for k in model.state_dict() if not k.startswith("output.dense")
    }


def test_traced_without_graph_breaks_and_trained_through_the_parents_forward():
    torch.manual_seed(1)
    sparse = sd.compile_model(Block().eval(), RULES, backend="llvm")
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        eager = sparse(x)
        compiled = torch.compile(sparse, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager)
    sparse.train()
    sparse(x).pow(2).sum().backward()
    assert sparse.output.dense.values.grad is not None and sparse.output.LayerNorm.weight.grad is not None


def test_a_parent_computing_something_else_is_refused():
    with pytest.raises(sd.SdslSemanticError, match="NormFirst, which does not compute norm"):
        sd.compile_model(Block(NormFirst).eval(), RULES, backend="llvm")
