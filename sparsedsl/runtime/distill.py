"""``sd.distill``: fine-tune a sparse model's stored values against the dense model it came from.

Only the stored values and biases of the ``SparseLinear`` layers train (through the sparse kernels'
own backward, the pattern fixed); every other parameter is frozen meanwhile. The loss is the mean
squared error of the student's output against the teacher's, plus that of each block's output (the
hidden states: the blocks are those of calibration, runtime/calibrate.py, e.g. each transformer
layer), on the same batch. A batch that is a mapping with an ``attention_mask`` (a tokenizer's
output) counts only the tokens it keeps: padding's hidden states are no part of what the model
computes for its user. The teacher's outputs are computed once per batch and kept (up to
``TEACHER_CACHE_BYTES``), so a cycled batch costs the student's forward and backward only. Adam's
learning rate decays from ``lr`` to 0 over the steps along a half cosine.

With ``gradual``, the patterns are not fixed from the start: gradual magnitude pruning (Zhu & Gupta
2017). Each layer restarts from its teacher's dense weight pruned by magnitude to ``gradual``, and
its sparsity rises to the one the student has now (its rule's target) along
``s_t = s_f + (s_0 - s_f) (1 - t / T)^3``, pruned again by magnitude at ``GRADUAL_EVENTS`` evenly
spaced steps over the first ``T`` = three quarters of the steps (the last quarter trains at the
target). Each pruning repacks the layers (a smaller pattern) and restarts Adam.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from sparsedsl.errors import SdslSemanticError
from sparsedsl.runtime.calibrate import block_names, run
from sparsedsl.runtime.modules import SparseLinear
from sparsedsl.runtime.prune import fixed_density, prune

GRADUAL_EVENTS = 10  # prunings of gradual pruning after the first
TEACHER_CACHE_BYTES = 1 << 30  # the teacher's outputs are kept up to this size, not recomputed each cycle


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable,
    steps: int,
    lr: float = 1e-3,
    verbose: bool = False,
    gradual: float | None = None,
) -> nn.Module:
    """Train ``student``'s sparse layers (in place) for ``steps`` batches of ``batches`` (cycled;
    each a model input as for ``compile_model``'s ``calibration``) to match ``teacher``'s outputs
    and hidden states, with Adam from learning rate ``lr`` (decayed along a half cosine); returns
    ``student``. With ``verbose``, a progress bar shows the loss. With ``gradual``, a sparsity in
    [0, 1), the layers restart from the teacher's weights at that sparsity and are pruned gradually
    to their present one (module docstring)."""
    layers = {name: m for name, m in student.named_modules() if isinstance(m, SparseLinear)}
    if not layers:
        raise SdslSemanticError("the student has no SparseLinear layer: distill a model from sd.compile_model")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise SdslSemanticError(f"steps must be a positive integer, got {steps!r}")
    batches = list(batches)
    if not batches:
        raise SdslSemanticError("distill has no batch")
    in_teacher = dict(teacher.named_modules())
    schedule = _schedule(layers, in_teacher, gradual, steps) if gradual is not None else {}
    blocks = [name for name in block_names(student, list(layers)) if name not in layers and name in in_teacher]
    grads = {p: p.requires_grad for p in (*student.parameters(), *teacher.parameters())}
    modes = {m: m.training for m in (*student.modules(), *teacher.modules())}
    for p in grads:
        p.requires_grad_(False)
    student.eval()
    teacher.eval()
    optimizer = _optimizer(layers, lr)
    bar = _bar(steps) if verbose else None
    targets = _Targets(teacher, blocks)
    try:
        for step in range(steps):
            if step in schedule:
                _prune(layers, schedule[step], step == 0)
                optimizer = _optimizer(layers, lr)
            batch = batches[step % len(batches)]
            want = targets(step % len(batches), batch)
            got = _outputs(student, batch, blocks)
            loss = _loss(got, want, _kept_tokens(batch))
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.4g}", sparsity=f"{_sparsity(layers):.3f}")
                bar.update()
    finally:
        if bar is not None:
            bar.close()
        for p, needed in grads.items():
            p.requires_grad_(needed)
        for m, mode in modes.items():
            m.training = mode
    return student


class _Targets:
    """The teacher's outputs for each batch: computed at the batch's first step and kept while
    they fit ``TEACHER_CACHE_BYTES`` (the teacher is frozen, so they never change)."""

    def __init__(self, teacher: nn.Module, blocks: list[str]) -> None:
        self.teacher, self.blocks = teacher, blocks
        self.kept: dict[int, list[torch.Tensor]] = {}
        self.bytes = 0

    def __call__(self, index: int, batch) -> list[torch.Tensor]:
        if index in self.kept:
            return self.kept[index]
        with torch.no_grad():
            want = _outputs(self.teacher, batch, self.blocks)
        size = sum(t.numel() * t.element_size() for t in want)
        if self.bytes + size <= TEACHER_CACHE_BYTES:
            self.kept[index] = want
            self.bytes += size
        return want


def _kept_tokens(batch) -> torch.Tensor | None:
    """The [batch, tokens] 0/1 weights of the tokens a tokenizer's batch keeps, or None."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return mask.to(torch.float32) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _loss(got: list[torch.Tensor], want: list[torch.Tensor], kept: torch.Tensor | None) -> torch.Tensor:
    """Sum over the outputs of their mean squared error, over the kept tokens of those shaped
    [batch, tokens, ...] when ``kept`` is given."""
    total = torch.zeros(())
    for g, w in zip(got, want):
        if kept is None or g.shape[:2] != kept.shape:
            total = total + nn.functional.mse_loss(g, w)
            continue
        weight = kept.reshape(*kept.shape, *([1] * (g.dim() - 2)))
        per_entry = (g - w).square() * weight
        total = total + per_entry.sum() / (weight.sum() * g[0, 0].numel()).clamp(min=1)
    return total


def _optimizer(layers: dict[str, SparseLinear], lr: float) -> torch.optim.Adam:
    """Adam over the layers' present values and biases, which it makes trainable."""
    params = [p for m in layers.values() for p in (m.values, m.bias) if p is not None]
    for p in params:
        p.requires_grad_(True)
    return torch.optim.Adam(params, lr=lr)


Plan = dict[str, tuple[nn.Linear, float]]  # per layer: its dense teacher and its sparsity at a step


def _schedule(layers: dict[str, SparseLinear], in_teacher: dict, start: float, steps: int) -> dict[int, Plan]:
    """The steps at which gradual pruning prunes, each with every layer's sparsity then."""
    if isinstance(start, bool) or not isinstance(start, numbers.Real) or not 0 <= start < 1:
        raise SdslSemanticError(f"gradual is the sparsity to start from, in [0, 1), got {start!r}")
    targets = {}
    for name, layer in layers.items():
        dense = in_teacher.get(name)
        if not isinstance(dense, nn.Linear) or dense.weight.shape != (layer.out_features, layer.in_features):
            raise SdslSemanticError(
                f"gradual pruning restarts layer '{name}' from the teacher's, but the teacher has no such nn.Linear"
            )
        if fixed_density(layer.program.format(layer.format)):
            raise SdslSemanticError(
                f"layer '{name}' is {layer.format}, a format of fixed density: it cannot be pruned gradually "
                "(use a format with a compressed level, or distill without gradual)"
            )
        targets[name] = (dense, 1 - layer.density)
    end = 3 * steps // 4
    events = sorted({round(end * j / GRADUAL_EVENTS) for j in range(GRADUAL_EVENTS + 1)})
    cubic = {t: (1 - t / end) ** 3 if end else 0.0 for t in events}
    return {t: {n: (d, s + (min(start, s) - s) * cubic[t]) for n, (d, s) in targets.items()} for t in events}


def _prune(layers: dict[str, SparseLinear], plan: Plan, first: bool) -> None:
    """Prune every layer by magnitude to its sparsity in ``plan``: the teacher's weight at the first
    pruning, its own (trained) weight after; the layer takes the smaller pattern."""
    for name, layer in layers.items():
        dense, sparsity = plan[name]
        weight = dense.weight.detach() if first else layer.sparse_weight().to_dense().detach()
        fmt = layer.program.format(layer.format)
        packed = layer.program.pack(layer.format, prune(weight, fmt, sparsity).to(layer.values.dtype))
        state = {f"structure_{i}": b for i, b in enumerate(packed.structure())} | {"values": packed.values}
        layer.load_state_dict(state, strict=False)
        if first and layer.bias is not None and dense.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(dense.bias)


def _sparsity(layers: dict[str, SparseLinear]) -> float:
    """The layers' sparsity together."""
    stored = sum(m.values.numel() for m in layers.values())
    return 1 - stored / sum(m.in_features * m.out_features for m in layers.values())


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
