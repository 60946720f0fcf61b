"""``compile_model``: replace a model's ``nn.Linear`` layers by sparse ones, by rules."""

from __future__ import annotations

import copy
import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparsedsl.errors import SdslError
from sparsedsl.frontend import ast
from sparsedsl.ir.formats import Format
from sparsedsl.runtime import ops
from sparsedsl.runtime.modules import SparseLinear
from sparsedsl.runtime.program import Program, compile
from sparsedsl.runtime.rules import Rule, rules_of

# Above this density a sparse layer is not expected to beat dense F.linear on a CPU
# (docs/BENCHMARKS.md): such layers are kept dense and the report says so.
MAX_SPARSE_DENSITY = 0.55


@dataclass(frozen=True)
class LayerReport:
    layer: str
    format: str
    density: float
    kernel: str
    sparse: bool
    note: str = ""


def _rules_from_source(
    rules, model_name: str | None, target: str, backend: str, cache_dir
) -> tuple[Program, list[Rule]]:
    program = compile(rules, target, backend, cache_dir=cache_dir)
    models = program.checked.models
    if not models:
        raise SdslError("the rules file has no 'model' block")
    if model_name is not None and model_name not in models:
        raise SdslError(f"no model '{model_name}' in the rules (models: {', '.join(models)})")
    decl: ast.ModelDecl = models[model_name] if model_name else next(iter(models.values()))
    return program, rules_of(program, decl)


def _rules_from_dict(rules: dict) -> list[Rule]:
    out = []
    for pattern, spec in rules.items():
        if isinstance(spec, str):
            out.append(Rule(pattern, spec))
        else:
            fmt, sparsity = spec
            out.append(Rule(pattern, fmt, sparsity))
    return out


def compile_model(
    model: nn.Module,
    rules,
    target: str = "cpu",
    cache_dir: str | os.PathLike | None = None,
    aot: str | os.PathLike | None = None,
    verbose: bool = False,
    model_name: str | None = None,
    keep_dense_above: float = MAX_SPARSE_DENSITY,
    backend: str = "tvm",
) -> nn.Module:
    """A copy of ``model`` whose matching ``nn.Linear`` layers are ``SparseLinear``.

    ``backend`` is ``"tvm"`` or ``"llvm"``; ``aot`` a directory from ``sparsedsl build`` (then
    ``rules`` is ignored: the build's rules apply and nothing compiles).
    ``rules`` is a .sdsl path or source with a ``model`` block, or a dict ``{glob: format}`` /
    ``{glob: (format, sparsity)}``. Layers with a sparsity are pruned by magnitude; others are
    packed as they are (a weight that does not fit is an error naming the layer). A layer whose
    density stays above ``keep_dense_above`` is kept dense. ``sd.report(model)`` tells what
    happened to each layer.
    """
    if aot is not None:
        from sparsedsl.runtime.aot import load

        program = load(aot)
        rule_list = program.rules
    elif isinstance(rules, dict):
        program, rule_list = None, _rules_from_dict(rules)
    else:
        program, rule_list = _rules_from_source(rules, model_name, target, backend, cache_dir)
    nn_prog = ops.nn_program(program, target, backend if program is None else program.backend)
    if cache_dir is not None:
        nn_prog.cache_dir = Path(cache_dir)
    result = copy.deepcopy(model)
    report: list[LayerReport] = []
    targets = [(name, mod) for name, mod in result.named_modules() if isinstance(mod, nn.Linear)]
    for name, linear in _progress(targets, verbose):
        rule = next((r for r in rule_list if fnmatch.fnmatchcase(name, r.pattern)), None)
        if rule is None:
            continue
        kernel_prog = program if rule.kernel else nn_prog
        try:
            sparse = SparseLinear.from_linear(linear, rule.format, rule.sparsity, kernel_prog, rule.kernel)
        except SdslError as err:
            raise type(err)(f"layer '{name}': {err.message}") from None
        kernel = sparse.kernel
        if sparse.density > keep_dense_above:
            report.append(
                LayerReport(
                    name,
                    rule.format,
                    sparse.density,
                    kernel,
                    False,
                    f"kept dense: density {sparse.density:.2f} > {keep_dense_above}",
                )
            )
            continue
        sparse.program.kernels[kernel].instance(sparse.program.format(rule.format))  # compile now
        _replace(result, name, sparse)
        note = f"fuses {_fuse(result, name, rule.fuse, sparse)}" if rule.fuse else ""
        report.append(LayerReport(name, rule.format, sparse.density, kernel, True, note))
    result._sparsedsl_report = report
    if verbose:
        print(format_report(report))
    return result


def _fuse(model: nn.Module, layer: str, pattern: str, sparse: SparseLinear) -> str:
    """Replace by ``nn.Identity`` the one module next to ``layer`` (under its parent) that matches
    ``pattern``: the kernel's epilogue computes it, and the layer keeps it for ``to_dense``."""
    parent = layer.rpartition(".")[0]
    names = [
        n
        for n, _ in model.named_modules()
        if n != layer and n.startswith(f"{parent}.") and fnmatch.fnmatchcase(n, pattern)
    ]
    if len(names) != 1:
        found = ", ".join(names) or "none"
        raise SdslError(f"layer '{layer}': fuse \"{pattern}\" must match one module next to it, found {found}")
    sparse.fused = model.get_submodule(names[0])
    _replace(model, names[0], nn.Identity())
    return names[0]


def _progress(items, verbose: bool):
    if not verbose:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="sparsedsl: compiling layers")


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def report(model: nn.Module) -> list[LayerReport]:
    """The per-layer report of a model returned by ``compile_model``."""
    return list(getattr(model, "_sparsedsl_report", []))


def format_report(rows: list[LayerReport]) -> str:
    """The report as a table."""
    head = f"{'layer':<48} {'format':<12} {'density':>7}  {'kernel':<18} {'runs'}"
    lines = [head, "-" * len(head)]
    for r in rows:
        runs = ("sparse" + (f", {r.note}" if r.note else "")) if r.sparse else r.note
        lines.append(f"{r.layer:<48} {r.format:<12} {r.density:>7.3f}  {r.kernel:<18} {runs}")
    return "\n".join(lines)


def prune_to(
    weight: torch.Tensor, format: str | Format, sparsity: float | None = None, program: Program | None = None
) -> torch.Tensor:
    """``sd.prune``: a copy of ``weight`` pruned by magnitude so that it fits ``format`` (a
    ``Format``, or its text: a prelude format, or one of ``program``)."""
    from sparsedsl.runtime.prune import prune

    if isinstance(format, Format):
        return prune(weight, format, sparsity)
    program = program if program is not None else ops.nn_program()
    return prune(weight, program.format(format), sparsity)
