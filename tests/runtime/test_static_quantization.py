"""Static int8 activation scales (``dtype int8 static``, ``"activations": "static"``) calibrated on
the compiled model, and the next layer's input quantization fused into the layer before
(runtime/requantize.py): numbers, report, state dict, AOT builds, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsedsl as sd
from sparsedsl.runtime.calibrate import Seen
from sparsedsl.runtime.quantized import QuantizedSparseLinear

BATCHES = [torch.randn(6, 64, generator=torch.Generator().manual_seed(s)) for s in range(2)]
KERNELS = """
kernel linear(X: f32[M, K], W: f32[N, K] @ {format}, b: f32[N]) -> (Y: f32[M, N]) {{
    Y[m, n] = sum(k) X[m, k] * W[n, k] + b[n]
}}
kernel linear_gelu(X: f32[M, K], W: f32[N, K] @ {format}, b: f32[N]) -> (Y: f32[M, N]) {{
    Y[m, n] = gelu(sum(k) X[m, k] * W[n, k] + b[n])
}}
"""
RULES = (
    KERNELS.format(format="BSR(4, 1)")
    + """model m {
    linear "0" use linear_gelu sparsity 0.5 fuse "1" dtype int8
    linear "2" use linear with CSR sparsity 0.5 dtype int8 static
}
"""
)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).eval()


class _Residual(nn.Module):
    """``b(a(x)) + a(x)``: a's output feeds b and the sum, so b's int8 input cannot replace it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        h = self.a(x)
        return self.b(h) + h


def test_the_static_magnitude_is_a_quantile_of_all_inputs():
    """``Seen`` keeps the magnitudes above the quantile: the one with floor(count * (1 - q)) above it."""
    xs = [torch.randn(50, 40, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    every = torch.cat([x.flatten() for x in xs]).abs().sort(descending=True).values
    for q in (1.0, 0.999, 0.99):
        seen = Seen(None, q)
        for x in xs:
            seen.add(x)
        assert seen.magnitude == every[int(len(every) * (1 - q))]
    assert Seen(None).magnitude == 0.0


def test_static_scale_is_calibrated_and_saturates():
    """The scale is the STATIC_QUANTILE of |x| over the calibration batches / 127 (their largest
    here: 768 values); the layer computes the integer product of the inputs quantized by it
    (saturated beyond it)."""
    rule = {"format": "CSR", "sparsity": 0.5, "dtype": "int8", "activations": "static"}
    compiled = sd.compile_model(_mlp(), {"0": rule}, calibration=BATCHES)
    layer = compiled[0]
    amax = max(float(b.abs().max()) for b in BATCHES)
    assert isinstance(layer, QuantizedSparseLinear) and layer.static
    assert float(layer.input_scale) == pytest.approx(amax / 127)
    x = torch.randn(5, 64) * 3  # beyond the calibrated range: saturates
    s = layer.input_scale
    xq = torch.round(x * (1 / s)).clamp(-128, 127).to(torch.int8)
    exact = (xq.int() @ layer.sparse_weight().to_dense().int().T).float() * s * layer.weight_scale + layer.bias
    torch.testing.assert_close(layer(x), exact, rtol=1e-6, atol=1e-5)
    assert torch.equal(layer.quantize(x)[0], xq)
    assert "int8 static inputs, scale" in sd.report(compiled)[0].note


@pytest.mark.parametrize("backend", ["tvm", "llvm"])
def test_fused_pair_emits_the_next_layers_int8_input(backend):
    """Layer 0 (GELU fused) feeds layer 2 (static) alone: its kernel writes layer 2's int8 input,
    and the model gives the numbers of the unfused quantized model."""
    compiled = sd.compile_model(_mlp().train(), RULES, calibration=BATCHES, backend=backend)
    first, second = compiled[0], compiled[2]
    assert first.emits_int8 and torch.equal(first.output_scale, second.input_scale)
    assert compiled.training and first.training  # the modes the model came with
    rows = sd.report(compiled)
    assert rows[0].kernel == "qlinear_bias_gelu_quant" and "emits 2's int8 input" in rows[0].note
    assert "int8 input from 0" in rows[1].note and "fuses 1" in rows[0].note
    x = torch.randn(9, 64)
    with torch.no_grad():
        y = compiled(x)
        hidden = first(x)
        assert hidden.dtype == torch.int8
        first.emit_int8(None)
        unfused = compiled(x)
    torch.testing.assert_close(y, unfused, rtol=0, atol=2 * float(second.input_scale * second.weight_scale.max()) * 96)
    cosine = nn.functional.cosine_similarity(y.flatten(), unfused.flatten(), dim=0)
    assert cosine > 0.999


def test_fusion_refused_where_the_output_feeds_more():
    """a's output feeds b and a sum: the fused model's output differs, so a keeps writing floats
    and the report says why."""
    int8 = {"format": "CSR", "sparsity": 0.5, "dtype": "int8"}
    rules = {"a": int8, "b": {**int8, "activations": "static"}}
    compiled = sd.compile_model(_Residual().eval(), rules, calibration=BATCHES)
    assert not compiled.a.emits_int8
    note = sd.report(compiled)[1].note
    assert "quantizes its input (the model with a writing it" in note
    alone = sd.compile_model(_mlp(), {"2": rules["b"]}, calibration=BATCHES)
    assert "quantizes its input (not an int8 layer's output)" in sd.report(alone)[0].note


BERT_RULES = (
    KERNELS.format(format="NM(2, 4)")
    + """model bert {
    linear "*.intermediate.dense" use linear_gelu sparsity 0.5 fuse "*.intermediate_act_fn" dtype int8 static
    linear "encoder.*" use linear sparsity 0.5 dtype int8 static
}
"""
)


def test_tiny_bert_fuses_intermediate_into_output(tmp_path):
    """BERT's intermediate.dense (GELU fused) writes output.dense's int8 input, found by observing
    the model, not by its class names; an AOT build carries the kernels, the state dict the scales
    and the fusion (N:M: one build per kernel, and the llvm backend: they compile fastest)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    batches = [{"input_ids": torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))}]
    sd.build(BERT_RULES, tmp_path, backend="llvm")
    manifest = (tmp_path / "manifest.json").read_text()
    assert '"qlinear_bias_gelu_quant"' in manifest and '"static"' in manifest
    compiled = sd.compile_model(model, None, aot=tmp_path, calibration=batches)
    rows = {r.layer: r for r in sd.report(compiled)}
    assert rows["encoder.layer.0.intermediate.dense"].kernel == "qlinear_bias_gelu_quant"
    assert "int8 input from encoder.layer.0.intermediate.dense" in rows["encoder.layer.0.output.dense"].note
    state = compiled.state_dict()
    assert "encoder.layer.0.output.dense.input_scale" in state
    assert "encoder.layer.0.intermediate.dense.output_scale" in state
    ids = torch.randint(0, 100, (3, 12))
    again = sd.compile_model(model, None, aot=tmp_path, calibration=[{"input_ids": ids}])  # other scales
    assert [r.kernel for r in sd.report(again)] == [r.kernel for r in sd.report(compiled)]
    with torch.no_grad():
        want = compiled(input_ids=ids).last_hidden_state
        assert not torch.equal(again(input_ids=ids).last_hidden_state, want)
        again.load_state_dict(state)
        assert torch.equal(again(input_ids=ids).last_hidden_state, want)


def test_static_rule_errors():
    rule = {"format": "CSR", "sparsity": 0.5, "dtype": "int8", "activations": "static"}
    with pytest.raises(sd.SdslSemanticError, match=r'rule "0" scales its int8 inputs statically, .*pass calibration='):
        sd.compile_model(_mlp(), {"0": rule})
    with pytest.raises(sd.SdslSemanticError, match=r':10:5: .*rule "2" scales its int8 inputs statically'):
        sd.compile_model(_mlp(), RULES)
    with pytest.raises(sd.SdslSemanticError, match="\"activations\" must be one of 'dynamic', 'static', got 'statik'"):
        sd.compile_model(_mlp(), {"0": {**rule, "activations": "statik"}}, calibration=BATCHES)
    with pytest.raises(sd.SdslSemanticError, match='scales the inputs of an int8 layer, give "dtype": "int8"'):
        sd.compile_model(_mlp(), {"0": {**rule, "dtype": "bf16"}}, calibration=BATCHES)
    with pytest.raises(sd.ArgumentError, match="takes int8 inputs only with a static input scale"):
        QuantizedSparseLinear.from_linear(_mlp()[0], "CSR", "int8")(torch.zeros(2, 64, dtype=torch.int8))
