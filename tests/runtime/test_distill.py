"""sd.distill: the stored values train against the dense teacher, the pattern and the teacher stay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsedsl as sd


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    block = lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))  # noqa: E731
    return nn.Sequential(block(), nn.Tanh(), block())


def _loss(student: nn.Module, teacher: nn.Module, batches) -> float:
    with torch.no_grad():
        return sum(float(nn.functional.mse_loss(student(x), teacher(x))) for x in batches)


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
