"""sd.distill: the stored values train against the dense teacher, the pattern and the teacher stay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsedsl as sd
from sparsedsl.runtime import distill as distill_module
from sparsedsl.runtime import ops
from sparsedsl.runtime.sparse_tensor import SparseTensor

USER = """
format Blocks2 = (i, j) -> (i / 2: dense, j / 2: compressed, i % 2: dense, j % 2: dense)
kernel linear_bias(X: f32[M, K], W: f32[N, K] @ CSR, b: f32[N]) -> (Y: f32[M, N]) {
    Y[m, n] = sum(k) X[m, k] * W[n, k] + b[n]
}
"""


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    block = lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))  # noqa: E731
    return nn.Sequential(block(), nn.Tanh(), block())


def _loss(student: nn.Module, teacher: nn.Module, batches) -> float:
    with torch.no_grad():
        return sum(float(nn.functional.mse_loss(student(x), teacher(x))) for x in batches)


def _padded_ell_weight() -> torch.Tensor:
    """A 24 x 32 weight whose rows hold 1 to 4 nonzeros: ELL(4) pads most rows with explicit zeros."""
    torch.manual_seed(3)
    weight = torch.zeros(24, 32)
    for row in range(24):
        cols = torch.randperm(32)[: 1 + row % 4]
        weight[row, cols] = torch.randn(cols.numel())
    return weight


def _layer(fmt: str) -> sd.SparseLinear:
    torch.manual_seed(0)
    linear = nn.Linear(32, 24)
    if fmt == "ELL(4) padded":
        program = ops.nn_program()
        return sd.SparseLinear(program.pack("ELL(4)", _padded_ell_weight()), linear.bias, program)
    if fmt == "Blocks2":
        return sd.SparseLinear.from_linear(linear, fmt, 0.6, program=sd.compile(USER))
    sparsity = {"NM(2, 4)": None, "ELL(4)": 0.875}.get(fmt, 0.7)
    return sd.SparseLinear.from_linear(linear, fmt, sparsity, method="magnitude")


GRADIENT_FORMATS = ["CSR", "COO", "CSC", "BSR(4, 1)", "BSR(2, 4)", "NM(2, 4)", "ELL(4)", "ELL(4) padded", "Blocks2"]


@pytest.mark.parametrize("fmt", GRADIENT_FORMATS)
def test_values_gradient_is_exact(fmt):
    """Each stored value's gradient equals dense autograd through the format's own unpacking (an
    independent reference: padded slots and repeated coordinates included)."""
    layer = _layer(fmt)
    x = torch.randn(2, 7, 32)
    g = torch.randn(2, 7, 24)
    layer(x).backward(g)
    weight = layer.sparse_weight()
    values = layer.values.detach().clone().requires_grad_()
    dense = SparseTensor.from_structure(weight.format, weight.shape, weight.structure(), values).to_dense()
    nn.functional.linear(x, dense, layer.bias.detach()).backward(g)
    torch.testing.assert_close(layer.values.grad, values.grad, rtol=1e-4, atol=1e-5)


def test_stored_positions_are_cached_per_structure():
    """Computed once per structure; an index buffer written in place is read again."""
    layer = _layer("CSR")
    fmt, shape = layer.program.format("CSR"), [24, 32]
    first = ops.stored_positions(fmt, shape, layer.structure())
    assert ops.stored_positions(fmt, shape, layer.structure()) is first
    with torch.no_grad():
        crd = layer.structure()[1]
        crd[0], crd[1] = crd[1].clone(), crd[0].clone()  # unsorted, but only the positions are read here
    moved = ops.stored_positions(fmt, shape, layer.structure())
    assert moved is not first and torch.equal(moved[:2], first[:2].flip(0))


def test_distillation_lowers_the_loss_and_keeps_the_pattern():
    teacher = _teacher()
    student = sd.compile_model(teacher, {"*": ("CSR", 0.8)})
    batches = [torch.randn(32, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    before = _loss(student, teacher, batches)
    patterns = [b.clone() for m in student.modules() if isinstance(m, sd.SparseLinear) for b in m.structure()]
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert sd.distill(student, teacher, batches, steps=60, lr=3e-3) is student
    assert _loss(student, teacher, batches) < 0.5 * before
    after = [b for m in student.modules() if isinstance(m, sd.SparseLinear) for b in m.structure()]
    assert all(torch.equal(a, b) for a, b in zip(patterns, after))
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())
    assert all(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize(
    "student, kwargs, message",
    [
        (nn.Linear(4, 4), {}, r"the student has no SparseLinear layer"),
        (None, {"steps": 0}, r"steps must be a positive integer, got 0"),
        (None, {"batches": []}, r"distill has no batch"),
    ],
)
def test_distill_errors(student, kwargs, message):
    teacher = _teacher()
    student = student if student is not None else sd.compile_model(teacher, {"*": ("CSR", 0.8)})
    args = {"batches": [torch.randn(4, 16)], "steps": 1} | kwargs
    with pytest.raises(sd.SdslSemanticError, match=message):
        sd.distill(student, teacher, **args)


def test_gradual_pruning_reaches_the_target_along_the_cubic_schedule():
    teacher = _teacher()
    student = sd.compile_model(teacher, {"*": ("CSR", 0.8)})
    stored = {n: m.values.numel() for n, m in student.named_modules() if isinstance(m, sd.SparseLinear)}
    layers = {n: m for n, m in student.named_modules() if isinstance(m, sd.SparseLinear)}
    plan = distill_module._schedule(layers, dict(teacher.named_modules()), 0.2, 40)
    assert sorted(plan) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    first, middle = plan[0]["0.0"][1], plan[15]["0.0"][1]
    assert first == pytest.approx(0.2) and plan[30]["0.0"][1] == pytest.approx(0.8, abs=0.01)
    assert middle == pytest.approx(0.8 + (0.2 - 0.8) * 0.5**3, abs=0.01)
    batches = [torch.randn(32, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    one_shot = _loss(student, teacher, batches)
    sd.distill(student, teacher, batches, steps=24, lr=3e-3, gradual=0.2)
    after = {n: m.values.numel() for n, m in student.named_modules() if isinstance(m, sd.SparseLinear)}
    assert after == stored
    assert _loss(student, teacher, batches) < 0.5 * one_shot


@pytest.mark.parametrize(
    "rules, gradual, message",
    [
        ({"*": ("CSR", 0.8)}, 1.0, r"gradual is the sparsity to start from, in \[0, 1\), got 1.0"),
        (
            {"*": {"format": "NM(2, 4)", "sparsity": None, "prune": "magnitude"}},
            0.0,
            r"layer '0.0' is NM\(2, 4\), a format of fixed density",
        ),
    ],
)
def test_gradual_errors(rules, gradual, message):
    teacher = _teacher()
    student = sd.compile_model(teacher, rules)
    with pytest.raises(sd.SdslSemanticError, match=message):
        sd.distill(student, teacher, [torch.randn(4, 16)], steps=2, gradual=gradual)
