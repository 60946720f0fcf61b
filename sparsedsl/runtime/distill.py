"""``sd.distill``: fine-tune a sparse model's stored values against the dense model it came from.

Only the stored values and biases of the ``SparseLinear`` layers train (through the sparse kernels'
own backward, the pattern fixed); every other parameter is frozen meanwhile. The loss is the mean
squared error of the student's output against the teacher's, plus that of each block's output (the
hidden states: the blocks are those of calibration, runtime/calibrate.py, e.g. each transformer
layer), on the same batch.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from sparsedsl.errors import SdslSemanticError
from sparsedsl.runtime.calibrate import block_names, run
from sparsedsl.runtime.modules import SparseLinear


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable,
    steps: int,
    lr: float = 1e-4,
    verbose: bool = False,
) -> nn.Module:
    """Train ``student``'s sparse layers (in place) for ``steps`` batches of ``batches`` (cycled;
    each a model input as for ``compile_model``'s ``calibration``) to match ``teacher``'s outputs
    and hidden states, with Adam at learning rate ``lr``; returns ``student``. With ``verbose``, a
    progress bar shows the loss."""
    layers = {name: m for name, m in student.named_modules() if isinstance(m, SparseLinear)}
    if not layers:
        raise SdslSemanticError("the student has no SparseLinear layer: distill a model from sd.compile_model")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise SdslSemanticError(f"steps must be a positive integer, got {steps!r}")
    batches = list(batches)
    if not batches:
        raise SdslSemanticError("distill has no batch")
    in_teacher = dict(teacher.named_modules())
    blocks = [name for name in block_names(student, list(layers)) if name not in layers and name in in_teacher]
    params = [p for m in layers.values() for p in (m.values, m.bias) if p is not None]
    grads = {p: p.requires_grad for p in (*student.parameters(), *teacher.parameters())}
    modes = {m: m.training for m in (*student.modules(), *teacher.modules())}
    for p in grads:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    student.eval()
    teacher.eval()
    optimizer = torch.optim.Adam(params, lr=lr)
    bar = _bar(steps) if verbose else None
    try:
        for step in range(steps):
            batch = batches[step % len(batches)]
            with torch.no_grad():
                want = _outputs(teacher, batch, blocks)
            got = _outputs(student, batch, blocks)
            loss = sum(nn.functional.mse_loss(g, w) for g, w in zip(got, want))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.4g}")
                bar.update()
    finally:
        if bar is not None:
            bar.close()
        for p, needed in grads.items():
            p.requires_grad_(needed)
        for m, mode in modes.items():
            m.training = mode
    return student


def _bar(steps: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=steps, desc="sparsedsl: distilling")


def _outputs(model: nn.Module, batch, blocks: list[str]) -> list[torch.Tensor]:
    """The output of each of ``blocks`` on ``batch``, then the model's."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, out) -> None:
        seen.setdefault(name, _tensor(out))

    hooks = [
        model.get_submodule(name).register_forward_hook(lambda _, __, out, name=name: keep(name, out))
        for name in blocks
    ]
    try:
        out = _tensor(run(model, batch))
    finally:
        for hook in hooks:
            hook.remove()
    return [*(seen[name] for name in blocks if name in seen), out]


def _tensor(out) -> torch.Tensor:
    """The first tensor of a module's output (a tensor, a tuple, or a dict such as a ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    items = out.values() if isinstance(out, Mapping) else out if isinstance(out, tuple | list) else ()
    tensor = next((t for t in items if isinstance(t, torch.Tensor)), None)
    if tensor is None:
        raise SdslSemanticError(f"distill compares tensors, but a module returned {type(out).__name__}")
    return tensor
