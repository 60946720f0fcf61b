"""The next layer's input quantization in a quantized layer's epilogue, where the model allows it.

A static int8 layer B quantizes its input by one scale (``input_scale``). When that input is the
output of an int8 layer A (its activation, if any, already in A's kernel), A's kernel can write
B's int8 input itself (``qlinear_bias_gelu_quant``: the output times ``1 / input_scale``, rounded
and saturated by the store), and B skips its quantization pass: one f32 tensor neither written
nor read again.

Whether the model allows it is observed, not assumed from class names: on a calibration batch,
forward hooks record the tensor object each int8 layer returns and the one each static layer
receives. A pair is a candidate when B receives A's very output at every call and A's output goes
to no other compiled layer. The model may still use A's output elsewhere (a residual, a norm), so
each fusion is kept only if the model's output on the batch stays what it was unfused (cosine
``MIN_COSINE``); otherwise it is undone, and the report says why.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from sparsedsl.errors import SdslError
from sparsedsl.runtime.calibrate import evaluating, run
from sparsedsl.runtime.quantized import QuantizedSparseLinear

MIN_COSINE = 0.999  # of the model's outputs on a calibration batch, fused against unfused


def fuse(model: nn.Module, layers: Mapping[str, nn.Module], batch) -> dict[str, str]:
    """Let each int8 layer of ``layers`` (compiled modules of ``model`` by name) whose output is
    the whole input of one static int8 layer write that layer's int8 input, where the model's
    output on ``batch`` stays the same; the report's note of each layer concerned."""
    int8 = {n: m for n, m in layers.items() if isinstance(m, QuantizedSparseLinear) and m.dtype_name == "int8"}
    static = {n: m for n, m in int8.items() if m.static}
    if not static:
        return {}
    with evaluating(model):  # no dropout in the outputs compared
        return _fuse(model, int8, static, batch)


def _fuse(
    model: nn.Module, int8: dict[str, QuantizedSparseLinear], static: dict[str, QuantizedSparseLinear], batch
) -> dict[str, str]:
    feeds, why = _observe(model, int8, static, batch)
    notes = {name: f"quantizes its input ({reason})" for name, reason in why.items()}
    reference = _output(model, batch)
    for producer, consumer in feeds.items():
        int8[producer].emit_int8(static[consumer].input_scale)
        cosine = _agreement(model, batch, reference)
        if cosine is not None and cosine >= MIN_COSINE:
            notes[producer] = f"emits {consumer}'s int8 input"
            notes[consumer] = f"int8 input from {producer}"
            continue
        int8[producer].emit_int8(None)
        found = "fails" if cosine is None else f"gives cosine {cosine:.4f} < {MIN_COSINE}"
        notes[consumer] = f"quantizes its input (the model with {producer} writing it {found})"
    return notes


def _observe(
    model: nn.Module, int8: dict[str, QuantizedSparseLinear], static: dict[str, QuantizedSparseLinear], batch
) -> tuple[dict[str, str], dict[str, str]]:
    """On one pass: ``{A: B}`` for each int8 layer A whose returned tensor is, at every call, the
    input static layer B receives (and no other static layer's); and why each other static layer
    has no such A."""
    returned: dict[int, tuple[str, torch.Tensor]] = {}  # id -> (layer, tensor): kept alive, ids stay unique
    received: dict[str, list[str | None]] = {name: [] for name in static}

    def output(name: str, result: torch.Tensor) -> None:
        returned[id(result)] = (name, result)

    def take(name: str, x: torch.Tensor) -> None:
        producer, tensor = returned.get(id(x), (None, None))
        received[name].append(producer if tensor is x else None)

    hooks = [m.register_forward_hook(lambda _, __, y, name=n: output(name, y)) for n, m in int8.items()]
    hooks += [m.register_forward_pre_hook(lambda _, args, name=n: take(name, args[0])) for n, m in static.items()]
    try:
        with torch.no_grad():
            run(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    feeds, why = {}, {}
    for name, producers in received.items():
        sources = set(producers)
        if len(sources) != 1 or None in sources:
            why[name] = "not an int8 layer's output"
            continue
        producer = sources.pop()
        others = [n for n, ps in received.items() if n != name and producer in ps]
        if others:
            why[name] = f"{producer}'s output feeds {others[0]} too"
        else:
            feeds[producer] = name
    return feeds, why


def _output(model: nn.Module, batch) -> torch.Tensor:
    """The model's floating-point outputs on ``batch``, flattened into one vector."""
    with torch.no_grad():
        return torch.cat([t.detach().float().flatten() for t in _tensors(run(model, batch))])


def _agreement(model: nn.Module, batch, reference: torch.Tensor) -> float | None:
    """The cosine of the model's outputs with ``reference``; None if the model fails or changes shape."""
    try:
        out = _output(model, batch)
    except (SdslError, RuntimeError, TypeError):
        return None
    if out.shape != reference.shape or not torch.isfinite(out).all():
        return None
    return float(nn.functional.cosine_similarity(out, reference, dim=0))


def _tensors(out) -> list[torch.Tensor]:
    """The floating-point tensors of a model's output (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, tuple | list):
        return [t for item in out for t in _tensors(item)]
    return []
