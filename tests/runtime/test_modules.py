"""SparseLinear, the custom ops (autograd, torch.compile) and compile_model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsedsl as sd

FORMATS = ["CSR", "BSR(4, 1)", "NM(2, 4)", "ELL(4)", "COO"]


def _masked_reference(layer: sd.SparseLinear):
    """The same layer as dense autograd on the masked weight."""
    dense = layer.to_dense()
    mask = layer.sparse_weight().with_values(torch.ones_like(layer.values)).to_dense() != 0
    return dense, mask


@pytest.mark.parametrize("fmt", FORMATS)
def test_sparse_linear_forward_backward_match_dense(fmt):
    torch.manual_seed(0)
    layer = sd.SparseLinear.from_linear(nn.Linear(32, 24), fmt, {"NM(2, 4)": 0.5, "ELL(4)": 0.875}.get(fmt, 0.7))
    dense, mask = _masked_reference(layer)
    x = torch.randn(3, 5, 32, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = layer(x), dense(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad, rtol=1e-4, atol=1e-5)
    grad_w = layer.sparse_weight().with_values(layer.values.grad).to_dense()
    torch.testing.assert_close(grad_w, dense.weight.grad * mask, rtol=1e-4, atol=1e-5)


def test_state_dict_roundtrip_and_repr():
    torch.manual_seed(1)
    a = sd.SparseLinear.from_linear(nn.Linear(16, 8), "BSR(4, 1)", 0.5)
    b = sd.SparseLinear.from_linear(nn.Linear(16, 8), "BSR(4, 1)", 0.5)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 16)
    torch.testing.assert_close(a(x), b(x))
    assert "format=BSR(4, 1)" in repr(a) and "density=0.500" in repr(a)
    assert isinstance(a.to_dense(), nn.Linear)


def test_wrong_dtype_is_a_clear_error():
    layer = sd.SparseLinear.from_linear(nn.Linear(16, 8), "CSR", 0.5)
    with pytest.raises(sd.ArgumentError, match="must be float32"):
        layer(torch.randn(2, 16, dtype=torch.float64))


def test_fused_nonlinear_kernel_refuses_gradients():
    prog = sd.compile("""
kernel lg(X: f32[M, K], W: f32[N, K] @ CSR, b: f32[N]) -> (Y: f32[M, N]) {
    Y[m, n] = gelu(sum(k) X[m, k] * W[n, k] + b[n])
}""")
    layer = sd.SparseLinear.from_linear(nn.Linear(16, 8), "CSR", 0.5, prog, "lg")
    x = torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), torch.nn.functional.gelu(layer.to_dense()(x)), rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="no gradient"):
        layer(x.requires_grad_()).sum().backward()
    out = layer(torch.randn(2, 16))  # runs; only its values want a gradient (a model's first layer)
    with pytest.raises(RuntimeError, match="no gradient"):
        out.sum().backward()


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))) + x)


def test_compile_model_dict_rules_and_report():
    torch.manual_seed(2)
    model = Tiny()
    compiled = sd.compile_model(model, {"up": ("BSR(4, 1)", 0.75), "down": ("NM(1, 4)", 0.75)})
    assert isinstance(model.up, nn.Linear), "the model passed in is left untouched"
    assert isinstance(compiled.up, sd.SparseLinear) and isinstance(compiled.down, sd.SparseLinear)
    assert isinstance(compiled.head, nn.Linear)
    rows = {r.layer: r for r in sd.report(compiled)}
    assert rows["up"].sparse and rows["up"].density == pytest.approx(0.25)
    reference = Tiny()
    reference.load_state_dict(model.state_dict())
    reference.up = compiled.up.to_dense()
    reference.down = compiled.down.to_dense()
    x = torch.randn(6, 32)
    torch.testing.assert_close(compiled(x), reference(x), rtol=1e-4, atol=1e-5)


def test_compile_model_from_sdsl_rules_keeps_dense_layers_and_names_bad_ones():
    rules = """
kernel lin(X: f32[M, K], W: f32[N, K] @ CSR, b: f32[N]) -> (Y: f32[M, N]) {
    Y[m, n] = sum(k) X[m, k] * W[n, k] + b[n]
}
model tiny {
    linear "up" use lin with CSR sparsity 0.2
    linear "do*" use lin sparsity 0.9
}
"""
    compiled = sd.compile_model(Tiny(), rules)
    rows = {r.layer: r for r in sd.report(compiled)}
    assert not rows["up"].sparse and "kept dense" in rows["up"].note
    assert rows["down"].sparse and rows["down"].kernel == "lin"
    with pytest.raises(sd.PackError, match="layer 'up'"):
        sd.compile_model(Tiny(), {"up": "NM(2, 4)"})


def test_torch_compile_fullgraph_and_backward():
    torch.manual_seed(3)
    compiled = sd.compile_model(Tiny(), {"up": ("BSR(4, 1)", 0.75), "down": ("CSR", 0.5)})
    x = torch.randn(5, 32)
    eager = compiled(x)
    graph = torch.compile(compiled, fullgraph=True)  # fullgraph: any graph break is an error
    torch.testing.assert_close(graph(x), eager, rtol=1e-5, atol=1e-6)
    explanation = torch._dynamo.explain(compiled)(x)
    assert explanation.graph_break_count == 0
    graph(x).sum().backward()
    assert compiled.up.values.grad is not None and compiled.down.values.grad is not None


def test_sparse_finetuning_keeps_the_pattern():
    torch.manual_seed(4)
    layer = sd.SparseLinear.from_linear(nn.Linear(16, 8), "NM(2, 4)", 0.5)
    before = [b.clone() for b in layer.structure()]
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x, target = torch.randn(32, 16), torch.randn(32, 8)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = ((layer(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8
    assert all(torch.equal(a, b) for a, b in zip(before, layer.structure()))


def test_wrong_input_width_names_the_layer_shape():
    layer = sd.SparseLinear.from_linear(nn.Linear(32, 8), "CSR", 0.5)
    with pytest.raises(sd.ArgumentError, match="32 features in the last dimension, got shape \\(4, 31\\)"):
        layer(torch.randn(4, 31))


def test_the_op_reuses_its_weight_and_still_checks_a_structure_written_in_place():
    """``sparsedsl::linear`` makes the weight its arguments describe once while they are the same
    tensors; an index buffer written in place afterwards is still checked before the kernel runs."""
    from sparsedsl.runtime import ops

    layer = sd.SparseLinear.from_linear(nn.Linear(16, 12), "CSR", sparsity=0.5)
    described = (layer.key, layer.format, [12, 16], layer.structure(), layer.values)
    assert ops.weight(*described) is ops.weight(*described)
    x = torch.randn(3, 16)

    def op():
        bias = layer.bias if layer.kernel_takes_bias else None
        y = torch.ops.sparsedsl.linear(
            x, layer.structure(), layer.values, [12, 16], layer.key, layer.format, layer.kernel, bias, None
        )
        return y if layer.kernel_takes_bias else y + layer.bias

    with torch.no_grad():
        torch.testing.assert_close(op(), layer.to_dense()(x))
        layer.structure()[-1][0] = 200  # a column index outside the 16 columns
        with pytest.raises(sd.PackError):
            op()


def test_a_model_that_has_run_saves_whole_and_its_copy_is_checked_again():
    """``torch.save(model)`` after forwards (eager, backward, torch.compile): the validation stamps
    and caches kept on its tensors are saved as nothing, so the loaded copy checks its structure
    again (a corrupted index is still an error)."""
    import io

    model = nn.Sequential(sd.SparseLinear.from_linear(nn.Linear(16, 12), "CSR", sparsity=0.5))
    x = torch.randn(3, 16, requires_grad=True)
    model(x).sum().backward()
    torch.compile(model)(x)
    saved = io.BytesIO()
    torch.save(model, saved)
    saved.seek(0)
    loaded = torch.load(saved, weights_only=False)
    torch.testing.assert_close(loaded(x), model(x))
    loaded[0].structure()[-1][0] = 200  # a column index outside the 16 columns
    with pytest.raises(sd.PackError):
        loaded(x)
