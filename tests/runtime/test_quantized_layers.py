"""QuantizedSparseLinear and compile_model rules with a dtype: int8 values with per-channel scales
and per-token activation scales, or bf16; the state dict keeps them; the report says so."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsedsl as sd
from sparsedsl.backends import host
from sparsedsl.runtime.quantized import QuantizedSparseLinear


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))


@pytest.mark.parametrize("fmt", ["CSR", "BSR(4, 1)", "NM(2, 4)", "COO"])
def test_int8_layer_is_its_integer_product_dequantized(fmt):
    """The layer's output is torch's int32 product of the quantized operands, dequantized: the
    quantization is the only difference from the f32 layer."""
    linear = _mlp()[0]
    sparsity = None if fmt == "NM(2, 4)" else 0.6  # N:M gives its own
    layer = QuantizedSparseLinear.from_linear(linear, fmt, "int8", sparsity, method="magnitude")
    x = torch.randn(3, 7, 64)
    xq, sx = layer.quantize(x.reshape(-1, 64))
    assert torch.equal(xq, torch.round(x.reshape(-1, 64) / sx[:, None]).clamp(-127, 127).to(torch.int8))
    wq = layer.sparse_weight().to_dense()
    exact = (xq.int() @ wq.int().T).float() * sx[:, None] * layer.weight_scale + layer.bias
    torch.testing.assert_close(layer(x), exact.reshape(3, 7, 96), rtol=1e-6, atol=1e-5)
    assert layer.values.dtype == torch.int8 and wq.abs().max() <= 127


def test_int8_and_bf16_stay_close_to_f32():
    linear = _mlp()[0]
    x = torch.randn(16, 64)
    for dtype, tolerance in (("int8", 0.03), ("bf16", 0.01)):
        layer = QuantizedSparseLinear.from_linear(linear, "BSR(4, 1)", dtype, 0.5)
        f32 = sd.SparseLinear.from_linear(linear, "BSR(4, 1)", 0.5)
        y, ref = layer(x), f32(x)
        assert (y - ref).abs().max() <= tolerance * ref.abs().max()


def test_state_dict_keeps_int8_values_and_scales():
    linear = _mlp()[0]
    layer = QuantizedSparseLinear.from_linear(linear, "BSR(4, 1)", "int8", 0.5)
    state = layer.state_dict()
    assert state["values"].dtype == torch.int8 and state["weight_scale"].shape == (96,)
    other = QuantizedSparseLinear.from_linear(linear, "BSR(4, 1)", "int8", 0.8)  # another nnz
    other.load_state_dict(state)
    x = torch.randn(5, 64)
    assert torch.equal(other(x), layer(x))
    state["structure_1"] = state["structure_1"].clone().fill_(200)  # a column block past K / 1
    with pytest.raises(sd.PackError, match="state_dict of layer"):
        other.load_state_dict(state)
    with pytest.raises(sd.PackError, match="values are torch.float32"):
        other.load_state_dict({**layer.state_dict(), "values": layer.values.float()})


@pytest.mark.parametrize("backend", ["tvm", "llvm"])
def test_compile_model_dtype_rules_and_report(backend):
    model = _mlp()
    rules = {"0": {"format": "BSR(4, 1)", "sparsity": 0.5, "dtype": "int8"}, "2": {"format": "CSR", "dtype": "bf16"}}
    compiled = sd.compile_model(model, {**rules, "2": {**rules["2"], "sparsity": 0.5}}, backend=backend)
    rows = sd.report(compiled)
    assert [(r.dtype, r.kernel) for r in rows] == [("int8", "qlinear_bias"), ("bf16", "blinear_bias")]
    assert "int8" in str(rows).splitlines()[2]
    assert isinstance(compiled[0], QuantizedSparseLinear) and compiled.state_dict()["2.values"].dtype == torch.bfloat16
    f32 = sd.compile_model(model, {"0": ("BSR(4, 1)", 0.5), "2": ("CSR", 0.5)}, backend=backend)
    x = torch.randn(4, 10, 64)
    cosine = nn.functional.cosine_similarity(compiled(x).flatten(), f32(x).flatten(), dim=0)
    assert cosine > 0.999


def test_bf16_pairs_of_k_run_on_the_dot_product_instruction():
    """A bf16 rule whose blocks are pairs of consecutive k (BSR(1, 2)) runs on ``vdpbf16ps`` on the
    llvm backend where the CPU has it (else as f32 FMAs), the sum of the bf16 values in f32."""
    rule = {"format": "BSR(1, 2)", "sparsity": 0.5, "dtype": "bf16"}
    layer = sd.compile_model(_mlp(), {"0": rule}, backend="llvm")[0]
    asm = layer.program.kernels[layer.kernel].source("asm", "BSR(1, 2)")
    assert ("vdpbf16ps" in asm) == host.bf16_dot(host.present())
    x = torch.randn(4, 10, 64)
    exact = x.bfloat16().double() @ layer.sparse_weight().to_dense().double().T + layer.bias.double()
    torch.testing.assert_close(layer(x).double(), exact, rtol=1e-5, atol=1e-5)


def test_an_unknown_dtype_is_refused():
    with pytest.raises(sd.SdslSemanticError, match="dtype must be one of int8, bf16, got 'int4'"):
        sd.compile_model(_mlp(), {"0": {"format": "CSR", "dtype": "int4"}})
    with pytest.raises(sd.ArgumentError, match="quantized layers are int8 or bf16"):
        QuantizedSparseLinear(sd.SparseTensor.pack(sd.compile("").format("CSR"), torch.eye(4)), "f16")


RULES = """
kernel linear(X: f32[M, K], W: f32[N, K] @ BSR(4, 1), b: f32[N]) -> (Y: f32[M, N]) {
    Y[m, n] = sum(k) X[m, k] * W[n, k] + b[n]
}
model m {
    linear "0" use linear sparsity 0.5 dtype int8
    linear "2" use linear with CSR sparsity 0.5 dtype bf16
}
"""


def test_model_block_dtype_and_aot_build(tmp_path):
    """``dtype`` in a model block; an AOT build carries the quantized kernels (nn.sdsl's, for the
    rules' formats) and gives the same numbers."""
    model = _mlp()
    compiled = sd.compile_model(model, RULES)
    assert [r.dtype for r in sd.report(compiled)] == ["int8", "bf16"]
    sd.build(RULES, tmp_path)
    manifest = (tmp_path / "manifest.json").read_text()
    assert '"qlinear_bias"' in manifest and '"quantize_rows"' in manifest and '"blinear_bias"' in manifest
    loaded = sd.compile_model(model, None, aot=tmp_path)
    x = torch.randn(3, 64)
    assert torch.equal(loaded(x), compiled(x))


def test_an_aot_build_holds_the_kernel_a_fused_layer_is_checked_by(tmp_path, monkeypatch):
    """compile_model checks an int8 layer's fused GELU against the layer's kernel without it: the
    build holds that kernel too, so compiling the model from it compiles nothing."""
    from sparsedsl.backends.llvm import jit

    rules = """
kernel lgelu(X: f32[M, K], W: f32[N, K] @ NM(2, 4), b: f32[N]) -> (Y: f32[M, N]) {
    Y[m, n] = gelu(sum(k) X[m, k] * W[n, k] + b[n])
}
model m {
    linear "0" use lgelu sparsity 0.5 fuse "1" dtype int8
}
"""
    sd.build(rules, tmp_path, backend="llvm")
    monkeypatch.setattr(jit, "build", lambda *a, **k: pytest.fail("a kernel was compiled"))
    loaded = sd.compile_model(_mlp(), None, aot=tmp_path)
    assert [(f.module, f.kernel) for f in sd.report(loaded).fused] == [("1", "qlinear_bias_gelu")]


def test_model_block_dtype_errors():
    with pytest.raises(sd.SdslSemanticError, match="unknown dtype 'int4' \\(known: int8, bf16\\)"):
        sd.compile(RULES.replace("dtype bf16", "dtype int4"))
    tanh = RULES.replace("+ b[n]", "+ b[n])").replace("= sum", "= tanh(sum")
    with pytest.raises(sd.SdslSemanticError, match="fuses gelu or relu into its quantized kernel"):
        sd.compile(tanh.replace("sparsity 0.5 dtype int8", 'sparsity 0.5 fuse "1" dtype int8'))
