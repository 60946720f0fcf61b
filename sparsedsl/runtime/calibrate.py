"""Sequential calibration: prune (or quantize) a model's layers in forward order, each from the
inputs it sees once the layers before it are compiled (as SparseGPT does).

The layers are grouped in *blocks*: the element of an ``nn.ModuleList`` or ``nn.Sequential`` that
holds them, deepest first (a transformer block, ``encoder.layer.3``), or the layer alone when no
container holds it. Each block costs one pass over the calibration batches: forward hooks add the
inputs of the block's layers to their ``Seen`` (the ``Gram`` ``X^T X`` where pruning needs it, the
largest magnitude for a static int8 scale), the pass stops once the block's last layer has run,
then the block's layers are compiled and replaced before the next block's pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparsedsl.errors import SdslSemanticError
from sparsedsl.runtime.prune import Gram

Layer = tuple[str, nn.Linear, Any]  # (qualified name, layer, what the caller pairs with it)


SLACK, SLACK_MIN = 4, 4096  # Seen's margin of magnitudes kept


@dataclass
class Seen:
    """What calibration measured of one layer's inputs: their ``Gram`` (None when the layer's
    compilation does not need it) and their largest magnitudes (``top``, largest first, of the
    ``count`` seen), for the ``quantile`` of them all (None: not measured). ``top`` keeps ``SLACK`` times the values
    above the quantile so far, plus ``SLACK_MIN``: the quantile's rank grows with the inputs still to
    come, and a value dropped is missed only if the inputs after it outnumber those before it
    ``SLACK`` to 1 (never for a quantile whose rank stays below ``SLACK_MIN``)."""

    gram: Gram | None
    quantile: float | None = 1.0
    top: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    count: int = 0

    def add(self, inputs: torch.Tensor) -> None:
        """Account for ``inputs``, ``[..., features]``."""
        if self.gram is not None:
            self.gram.add(inputs)
        if self.quantile is None:
            return
        magnitudes = inputs.detach().float().abs().flatten()
        self.count += len(magnitudes)
        candidates = torch.cat([self.top, magnitudes])
        self.top = candidates.topk(min(SLACK * self._rank() + SLACK_MIN, len(candidates))).values

    @property
    def magnitude(self) -> float:
        """The ``quantile`` of the magnitudes seen (the largest for 1; 0 before any input): the one
        with ``floor(count * (1 - quantile))`` above it."""
        return float(self.top[self._rank() - 1]) if self.count else 0.0

    def _rank(self) -> int:
        return int(self.count * (1 - self.quantile)) + 1


class _BlockDone(Exception):
    """Raised by a hook once a block's last layer has run: the rest of the pass is not needed."""


def run(model: nn.Module, batch):
    """``model``'s output on one batch: a dict as keyword arguments, a tuple or list as positional
    ones, anything else as the one argument."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    return model(batch)


def calibrate(
    model: nn.Module,
    layers: Sequence[Layer],
    batches: Iterable,
    compile_layer: Callable[[Layer, Seen], None],
    progress: Callable[[Iterable, str], Iterable] = lambda items, _: items,
    measures: Callable[[Layer], Seen] = lambda layer: Seen(Gram.empty(layer[1].in_features), None),
) -> None:
    """Call ``compile_layer`` on each of ``layers`` (modules of ``model``) in forward order, with
    what it sees over ``batches`` once every layer before it is compiled: ``measures(layer)``, an
    empty ``Seen`` saying what to measure (by default the ``Gram`` alone)."""
    batches = list(batches)
    if not batches:
        raise SdslSemanticError("calibration has no batch: measuring the layers' inputs needs at least one")
    with evaluating(model):  # no dropout in the inputs measured
        for block in progress(_blocks(model, _forward_order(model, layers, batches[0])), "sparsedsl: calibrating"):
            seen = _capture(model, block, batches, measures)
            for layer in block:
                compile_layer(layer, seen[layer[0]])


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """``model`` in eval mode within, each module's mode restored after."""
    training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, mode in training.items():
            module.training = mode


def _forward_order(model: nn.Module, layers: Sequence[Layer], batch) -> list[Layer]:
    """``layers`` in the order ``model`` first calls them on ``batch``; one it never calls is an error."""
    seen: dict[str, int] = {}

    def note(name: str) -> None:
        seen.setdefault(name, len(seen))

    hooks = [linear.register_forward_pre_hook(lambda *_, name=name: note(name)) for name, linear, _ in layers]
    try:
        _forward(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    unseen = [name for name, _, _ in layers if name not in seen]
    if unseen:
        raise SdslSemanticError(
            f"layer '{unseen[0]}' never runs on the calibration batches: its rule needs its inputs measured"
        )
    return sorted(layers, key=lambda layer: seen[layer[0]])


def _containers(model: nn.Module) -> set[str]:
    return {name for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList | nn.Sequential)}


def block_names(model: nn.Module, layers: list[str]) -> list[str]:
    """The blocks that hold ``layers`` (qualified names), each once, in order."""
    containers = _containers(model)
    return list(dict.fromkeys(_block_of(name, containers) for name in layers))


def _blocks(model: nn.Module, ordered: list[Layer]) -> list[list[Layer]]:
    """Consecutive layers of one block, block by block."""
    containers = _containers(model)
    blocks: list[list[Layer]] = []
    last = None
    for layer in ordered:
        key = _block_of(layer[0], containers)
        if key != last:
            blocks.append([])
            last = key
        blocks[-1].append(layer)
    return blocks


def _block_of(name: str, containers: set[str]) -> str:
    """The deepest container element that holds layer ``name`` (its own name if none)."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        if ".".join(parts[: end - 1]) in containers:
            return ".".join(parts[:end])
    return name


def _capture(model: nn.Module, block: list[Layer], batches: list, measures: Callable[[Layer], Seen]) -> dict[str, Seen]:
    """What each block layer sees of its inputs over ``batches`` (what ``measures`` says to
    measure), one pass each, stopped after the block's last layer."""
    seen = {layer[0]: measures(layer) for layer in block}
    last = block[-1][0]

    def take(args: tuple, kwargs: dict, name: str) -> None:
        seen[name].add(args[0] if args else kwargs["input"])
        if name == last:
            raise _BlockDone

    hooks = [
        linear.register_forward_pre_hook(lambda _, args, kwargs, name=name: take(args, kwargs, name), with_kwargs=True)
        for name, linear, _ in block
    ]
    try:
        for batch in batches:
            with contextlib.suppress(_BlockDone):
                _forward(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _forward(model: nn.Module, batch) -> None:
    with torch.no_grad():
        run(model, batch)
