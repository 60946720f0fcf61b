"""One-shot pruning by magnitude, Wanda and SparseGPT: the pattern fits every format, the methods
that see the inputs lose less of the layer's output, and compile_model calibrates layer by layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsedsl as sd
from sparsedsl.runtime import calibrate, prune
from sparsedsl.runtime.prune import fixed_density
from tests.strategies import FORMATS

USER_FORMATS = """
format VNM = (i, j) -> (i / 4: dense, j / 4: dense, j % 4: nm(2, 4), i % 4: dense)
format TILE = (i, j) -> (i / 2: dense, j / 2: compressed, i % 2: dense, j % 2: dense)
kernel lin(X: f32[M, K], W: f32[N, K] @ CSR, b: f32[N]) -> (Y: f32[M, N]) {
    Y[m, n] = sum(k) X[m, k] * W[n, k] + b[n]
}
"""
METHODS = ("magnitude", "wanda", "sparsegpt")


@pytest.fixture(scope="module")
def program():
    return sd.compile(USER_FORMATS)


def _inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    """Correlated inputs whose channels have very uneven norms (as a transformer's do)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 1, features)[torch.randperm(features, generator=g)]
    mix = torch.eye(features) + 0.3 * torch.randn(features, features, generator=g)
    return torch.randn(tokens, features, generator=g) @ mix * scale


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fmt, rows, cols", [*FORMATS, ("TILE", 2, 2)])
def test_the_pattern_fits_the_format(program, fmt, rows, cols, method, monkeypatch):
    monkeypatch.setattr(prune, "SWEEP_BLOCK", 8)  # several blocks of columns: earlier choices kept
    n, k = 8 * rows, 16 * cols
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    sparsity = None if fixed_density(program.format(fmt)) else 0.6
    pruned = sd.prune(weight, fmt, sparsity, program, method=method, inputs=_inputs(64, k))
    packed = program.pack(fmt, pruned)
    assert torch.equal(packed.to_dense(), pruned)
    # the same number of units as magnitude keeps, the format's own density for fixed ones
    assert packed.nnz == program.pack(fmt, sd.prune(weight, fmt, sparsity, program)).nnz
    if method != "sparsegpt":  # the others only zero weights, SparseGPT updates those it keeps
        assert torch.equal(pruned[pruned != 0], weight[pruned != 0])


def _output_error(weight: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ weight.T - x @ pruned.T) ** 2).sum())


@pytest.mark.parametrize("fmt, sparsity", [("CSR", 0.5), ("NM(2, 4)", None), ("BSR(4, 1)", 0.75)])
def test_the_calibrated_methods_lose_less_of_the_output(fmt, sparsity):
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    x = _inputs(256, 64)
    error = {m: _output_error(weight, sd.prune(weight, fmt, sparsity, method=m, inputs=x), x) for m in METHODS}
    assert error["sparsegpt"] < error["wanda"] < error["magnitude"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "obs"}, r"unknown pruning method 'obs' \(known: magnitude, wanda, sparsegpt\)"),
        ({"method": "sparsegpt"}, r"pruning by sparsegpt needs inputs=: a \[tokens, K\] sample"),
        ({"method": "wanda", "inputs": torch.randn(5, 7)}, r"inputs must be \[tokens, 16\] .* got \[5, 7\]"),
        ({"method": "wanda", "inputs": torch.randn(0, 16)}, r"at least one token"),
    ],
)
def test_prune_errors(kwargs, message):
    with pytest.raises(sd.PackError, match=message):
        sd.prune(torch.randn(8, 16), "CSR", 0.5, **kwargs)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def test_calibration_is_sequential_the_second_layer_sees_the_pruned_first(monkeypatch):
    batches = [_inputs(24, 16, seed) for seed in range(3)]
    grams = {}
    real = calibrate._capture

    def spy(model, block, batches, *options):
        out = real(model, block, batches, *options)
        grams.update(out)
        return out

    monkeypatch.setattr(calibrate, "_capture", spy)
    rules = {"*": {"format": "CSR", "sparsity": 0.5, "prune": "sparsegpt"}}
    sparse = sd.compile_model(_mlp(), rules, calibration=batches)
    assert set(grams) == {"0", "2"}
    hidden = torch.cat([torch.relu(sparse[0](x)) for x in batches]).double()
    torch.testing.assert_close(grams["2"].gram.xtx, hidden.T @ hidden)
    dense_hidden = torch.cat([torch.relu(_mlp()[0](x)) for x in batches]).double()
    assert not torch.allclose(grams["2"].gram.xtx, dense_hidden.T @ dense_hidden)
    assert [r.sparse for r in sd.report(sparse)] == [True, True]


def test_calibrated_rules_in_a_model_block_and_their_errors(program):
    rules = '    linear "0" use lin with NM(2, 4) prune wanda\n    linear "2" use lin sparsity 0.5\n'
    source = USER_FORMATS + "model m {\n" + rules + "}\n"
    with pytest.raises(sd.SdslSemanticError, match=r':8:5: .*rule "0" prunes by wanda, .*pass calibration='):
        sd.compile_model(_mlp(), source)
    batches = [{"input": _inputs(8, 16)}]
    sparse = sd.compile_model(_mlp(), source, calibration=batches)
    assert [r.density for r in sd.report(sparse)] == [0.5, 0.5]
    bad = source.replace("prune wanda", "prune wandaa")
    with pytest.raises(sd.SdslSemanticError, match=r":8:44: .*unknown pruning method 'wandaa' \(known: magnitude"):
        sd.compile(bad)


@pytest.mark.parametrize(
    "rules, message",
    [
        ({"*": {"format": "CSR", "prune": "obs"}}, r"rule \"\*\": unknown pruning method 'obs' \(known: magnitude"),
        ({"*": {"format": "CSR", "sparsity": 0.5, "method": "wanda"}}, r"is not a rule; the rules are a dict"),
        ({"*": {"format": "CSR", "sparsity": 0.5, "prune": "sparsegpt"}}, r'"\*" prunes by sparsegpt, .*calibration='),
    ],
)
def test_dict_rule_errors(rules, message):
    with pytest.raises(sd.SdslSemanticError, match=message):
        sd.compile_model(_mlp(), rules)


class _Skips(nn.Module):
    """Calls its first layer by keyword and never its second."""

    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = nn.Linear(16, 8), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(input=x)


def test_a_calibrated_layer_the_batches_never_reach_is_an_error():
    rules = {"*": {"format": "CSR", "sparsity": 0.5, "prune": "wanda"}}
    with pytest.raises(sd.SdslSemanticError, match=r"layer 'unused' never runs on the calibration batches"):
        sd.compile_model(_Skips(), rules, calibration=[_inputs(8, 16)])
    sparse = sd.compile_model(_Skips(), {"used": rules["*"]}, calibration=[_inputs(8, 16)])
    assert isinstance(sparse.used, sd.SparseLinear)
