"""Model rules: every rule compiles a layer or is an error naming it; dict forms, fuse, fixed
densities and the report."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import sparsedsl as sd

LINEAR_GELU = """
kernel lg(X: f32[M, K], W: f32[N, K] @ CSR, b: f32[N]) -> (Y: f32[M, N]) {
    Y[m, n] = gelu(sum(k) X[m, k] * W[n, k] + b[n])
}
"""


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))


@pytest.mark.parametrize(
    "rules, message",
    [
        ({"*.dense": ("BSR(4, 1)", 0.9)}, "rule \"\\*.dense\" matches no module name .* nn.Linear layers are '0', '2'"),
        ({"1": "CSR"}, 'rule "1" matches no nn.Linear layer.*modules it matches: 1 GELU'),
        ({"*": ("CSR", 0.5), "2": "CSR"}, "rule \"2\" matches no layer left: '2' matches the earlier rule \"\\*\""),
    ],
)
def test_a_rule_that_compiles_no_layer_is_an_error(rules, message):
    with pytest.raises(sd.SdslSemanticError, match=message):
        sd.compile_model(_mlp(), rules)


def test_gpt2_conv1d_layers_are_compiled_not_silently_skipped():
    """transformers' Conv1D is a linear layer for the rules (tests/runtime/test_decoders.py checks
    what the compiled model computes)."""
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    gpt2 = transformers.GPT2LMHeadModel(config)
    rows = sd.report(sd.compile_model(gpt2, {"transformer.h.*": ("BSR(4, 1)", 0.9)}))
    layers = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert [r.layer for r in rows] == [f"transformer.h.0.{n}" for n in layers] and all(r.sparse for r in rows)


def test_an_unmatched_rule_of_a_file_is_located():
    source = LINEAR_GELU.replace("gelu(", "(") + 'model m {\n    linear "2" use lg\n    linear "dense" use lg\n}\n'
    with pytest.raises(sd.SdslSemanticError) as info:
        sd.compile_model(_mlp(), source)
    assert info.value.render().startswith("<string>:7:5: error: rule \"dense\" matches no module name")


def test_layers_kept_dense_did_match():
    compiled = sd.compile_model(_mlp(), {"*": ("CSR", 0.1)})
    rows = sd.report(compiled)
    assert [r.layer for r in rows] == ["0", "2"] and not any(r.sparse for r in rows)
    assert all("kept dense" in r.note for r in rows)


@pytest.mark.parametrize(
    "rules, message",
    [
        ({"0": ("CSR",)}, r"rule '0': \('CSR',\) is not a rule; the rules are a dict \{glob: format\}"),
        ({"0": ("CSR", "0.9")}, r"rule \"0\": sparsity must be None or a number in \[0, 1\), got '0.9'"),
        ({"0": ("CSR", 1.5)}, r"sparsity must be None or a number in \[0, 1\), got 1.5"),
        ({"0": ("CSR", True)}, r"got True"),
        ({"0": (3, 0.5)}, r"\(3, 0.5\) is not a rule"),
        ({"0": ("CSR", 0.5, 1)}, r"is not a rule"),
        ({1: "CSR"}, r"rule 1: 'CSR' is not a rule"),
        ({"0": "XYZ"}, r"rule \"0\": invalid format 'XYZ'"),
        ({}, r"there are no rules"),
        (["0"], r"compile_model takes its rules as a .sdsl path or source, or a dict"),
    ],
)
def test_dict_rules_say_what_they_accept(rules, message):
    with pytest.raises(sd.SdslError, match=message):
        sd.compile_model(_mlp(), rules)


def test_a_kernel_that_is_not_a_linear_layer_is_refused_before_any_layer():
    source = """
kernel t(X: f32[M, K], W: f32[K, N] @ CSR) -> (Y: f32[M, N]) { Y[m, n] = sum(k) X[m, k] * W[k, n] }
model m { linear "*" use t sparsity 0.5 }
"""
    with pytest.raises(sd.SdslSemanticError) as info:
        sd.compile_model(_mlp(), source)
    assert info.value.render().startswith("<string>:3:26: error: kernel 't' cannot run a linear layer")


def test_a_kernel_of_another_dtype_names_the_layer():
    with pytest.raises(sd.ArgumentError, match="layer '0': its weight is float64, but kernel 'linear_bias' takes X"):
        sd.compile_model(_mlp().double(), {"0": ("CSR", 0.5)})


def test_fuse_works_at_the_top_of_a_sequential():
    model = _mlp()
    rules = LINEAR_GELU + 'model m { linear "0" use lg with CSR sparsity 0.5 fuse "1" }'
    compiled = sd.compile_model(model, rules)
    assert isinstance(compiled[1], nn.Identity) and sd.report(compiled)[0].note == "fuses 1"
    reference = nn.Sequential(compiled[0].to_dense(), model[2])
    x = torch.randn(5, 16)
    torch.testing.assert_close(compiled(x), reference(x), rtol=1e-4, atol=1e-5)


def test_a_kernel_computing_more_than_the_layer_must_fuse_what_it_replaces():
    with pytest.raises(sd.SdslSemanticError, match=r"kernel 'lg' computes more than the layer's x W\^T \+ b"):
        sd.compile_model(_mlp(), LINEAR_GELU + 'model m { linear "0" use lg with CSR sparsity 0.5 }')


def test_fuse_refuses_a_module_with_parameters():
    rules = LINEAR_GELU + 'model m { linear "0" use lg with CSR sparsity 0.5 fuse "2" }'
    with pytest.raises(sd.SdslSemanticError, match="matches '2', which holds parameters"):
        sd.compile_model(_mlp(), rules)


def test_a_fixed_density_format_refuses_another_sparsity():
    w = torch.randn(16, 32)
    with pytest.raises(sd.PackError, match=r"ELL\(8\) stores a fixed density of 0.25 .* sparsity 0.5 cannot"):
        sd.prune(w, "ELL(8)", 0.5)
    with pytest.raises(sd.PackError, match=r"layer '0': NM\(2, 4\) stores a fixed density of 0.5"):
        sd.compile_model(_mlp(), {"0": ("NM(2, 4)", 0.9)})
    assert (sd.prune(w, "ELL(8)", 0.75) != 0).sum() == 16 * 8
    assert (sd.prune(w, "NM(2, 4)", None) != 0).sum() == 16 * 16
    assert (sd.prune(torch.randn(4, 12), "NM(1, 3)", 0.67) != 0).sum() == 4 * 4  # rounded to a percent
    dense = sd.compile("format D = (i, j) -> (i: dense, j: dense)").format("D")
    assert torch.equal(sd.prune(w, dense, 0.0), w)
    with pytest.raises(sd.PackError, match="fixed density of 1"):
        sd.prune(w, dense, 0.3)


def test_the_report_prints_as_a_table():
    compiled = sd.compile_model(_mlp(), {"0": ("CSR", 0.75), "2": ("CSR", 0.1)})
    rows = sd.report(compiled)
    assert isinstance(rows, list) and rows[0].layer == "0" and rows[0].sparse
    lines = str(rows).splitlines()
    assert lines[0].split() == ["layer", "format", "density", "dtype", "kernel", "runs"]
    assert lines[2].split()[:4] == ["0", "CSR", "0.250", "f32"] and "kept dense" in lines[3]


def test_fuse_refuses_a_module_the_kernel_does_not_compute():
    relu = LINEAR_GELU.replace("gelu(", "relu(")
    with pytest.raises(sd.SdslSemanticError, match=r"matches '1' \(GELU\), but kernel 'lg' computes something else"):
        sd.compile_model(_mlp(), relu + 'model m { linear "0" use lg with CSR sparsity 0.5 fuse "1" }')


def test_fuse_refuses_a_module_fused_already():
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 8))
    rules = LINEAR_GELU + 'model m { linear "*" use lg with CSR sparsity 0.5 fuse "1" }'
    with pytest.raises(sd.SdslSemanticError, match="layer '2': fuse \"1\" matches '1', fused by layer '0' already"):
        sd.compile_model(model, rules)


def test_a_square_kernel_names_the_layer_that_is_not():
    source = """
kernel sq(X: f32[M, K], W: f32[K, K] @ CSR, b: f32[K]) -> (Y: f32[M, K]) { Y[m, n] = sum(k) X[m, k] * W[n, k] + b[n] }
model m { linear "*" use sq sparsity 0.5 }
"""
    with pytest.raises(sd.ArgumentError, match=r"layer '0': kernel 'sq' takes a square weight \[K, K\], but this"):
        sd.compile_model(_mlp(), source)
