"""Model rules: which layers a ``model`` block (or an ahead-of-time build of one) makes sparse, with
which kernel and format, and which attention modules run sparsedsl's attention kernels.
``compile_model`` applies them; ``sparsedsl build`` records the layers' rules."""

from __future__ import annotations

from dataclasses import dataclass

from sparsedsl.frontend import ast
from sparsedsl.runtime.program import Program


@dataclass(frozen=True)
class Rule:
    """Layers whose qualified name matches ``pattern`` use ``kernel`` with ``format``, pruned by
    ``prune`` (a method of ``PRUNE_METHODS``; None: by magnitude if a sparsity is given, else not),
    their values stored as ``dtype`` (None: as the layer's; "int8" or "bf16": runtime/quantized.py),
    an int8 layer's inputs scaled per token when called (``activations`` "dynamic") or by one scale
    calibrated ahead ("static")."""

    pattern: str
    format: str
    sparsity: float | None = None
    kernel: str | None = None
    fuse: str | None = None
    prune: str | None = None
    dtype: str | None = None
    activations: str = "dynamic"


@dataclass(frozen=True)
class AttentionRule:
    """Attention modules whose qualified name matches ``pattern`` run nn.sdsl's ``attention``
    kernel (``format`` None), or its ``block_attention`` on the blocks of ``format`` that hold a
    query and a key at most ``window`` tokens apart (runtime/attention.py's ``BlockPattern``)."""

    pattern: str
    format: str | None = None
    window: int | None = None


def attention_target_problem(target: str) -> str | None:
    """Why attention rules cannot apply to a program for ``target``, or None: the attention
    kernels run on the CPU."""
    return None if target == "cpu" else f"runs the attention kernels on the CPU, not {target}"


def attention_rules_of(program: Program, decl: ast.ModelDecl) -> list[AttentionRule]:
    """The attention rules of a checked ``model`` block, formats resolved."""
    return [
        AttentionRule(r.pattern, r.format and program.checked.format(r.format).label, r.window) for r in decl.attention
    ]


def rules_of(program: Program, decl: ast.ModelDecl) -> list[Rule]:
    """The rules of a checked ``model`` block, formats resolved (the kernel's own when unnamed)."""
    out = []
    for r in decl.rules:
        fmt = program.checked.format(r.format) if r.format else program.kernels[r.kernel.text]._default_format()
        prune, dtype = r.prune and r.prune.text, r.dtype and r.dtype.text
        activations = r.activations.text if r.activations else "dynamic"
        out.append(Rule(r.pattern, fmt.label, r.sparsity, r.kernel.text, r.fuse, prune, dtype, activations))
    return out
