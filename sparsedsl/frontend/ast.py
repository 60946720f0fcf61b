"""The syntax tree of a .sdsl file: small frozen dataclasses, each node with its source span."""

from __future__ import annotations

from dataclasses import dataclass

from sparsedsl.errors import Span


@dataclass(frozen=True)
class Name:
    """An identifier with where it was written."""

    text: str
    span: Span


# ---- formats -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """A format parameter or level argument: an integer literal or a name."""

    value: int | str
    span: Span


@dataclass(frozen=True)
class DimExpr:
    """``i``, ``i / bm`` or ``i % bm``: which part of a tensor dimension a level stores."""

    dim: Name
    op: str | None
    operand: Param | None
    span: Span


@dataclass(frozen=True)
class LevelDecl:
    """One storage level: ``j / bn: compressed``."""

    dim: DimExpr
    level_type: Name
    args: tuple[Param, ...]
    span: Span


@dataclass(frozen=True)
class FormatDecl:
    """``format NAME(params) = (dims) -> (levels)``."""

    name: Name
    params: tuple[Name, ...]
    dims: tuple[Name, ...]
    levels: tuple[LevelDecl, ...]
    span: Span


# ---- kernels -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FormatRef:
    """``BSR(4, 1)`` after ``@``, or the name of a sparse input whose pattern an output shares."""

    name: Name
    args: tuple[Param, ...]
    span: Span


@dataclass(frozen=True)
class TensorDecl:
    """A kernel parameter: ``W: f32[N, K] @ BSR(4, 1)``; a scalar has no shape."""

    name: Name
    dtype: Name
    shape: tuple[Name, ...] | None
    storage: FormatRef | None
    span: Span


@dataclass(frozen=True)
class Access:
    """``X[m, k]``."""

    tensor: Name
    indices: tuple[Name, ...]
    span: Span


@dataclass(frozen=True)
class Number:
    value: float
    span: Span


@dataclass(frozen=True)
class ScalarRef:
    """A scalar kernel parameter used in an expression."""

    name: Name
    span: Span


@dataclass(frozen=True)
class BinOp:
    op: str
    lhs: Expr
    rhs: Expr
    span: Span


@dataclass(frozen=True)
class Neg:
    operand: Expr
    span: Span


@dataclass(frozen=True)
class Call:
    """An elementwise function: ``gelu(x)``, ``relu(x)``, ``max(a, b)``."""

    func: Name
    args: tuple[Expr, ...]
    span: Span


@dataclass(frozen=True)
class Reduction:
    """``sum(k) body`` or ``max(k) body`` (``op`` "sum" or "max")."""

    indices: tuple[Name, ...]
    body: Expr
    span: Span
    op: str = "sum"


Expr = Access | Number | ScalarRef | BinOp | Neg | Call | Reduction


@dataclass(frozen=True)
class Assign:
    """``target = value``; ``local``: ``let target = value`` defines an intermediate tensor."""

    target: Access
    value: Expr
    span: Span
    local: bool = False


@dataclass(frozen=True)
class KernelDecl:
    name: Name
    inputs: tuple[TensorDecl, ...]
    outputs: tuple[TensorDecl, ...]
    body: tuple[Assign, ...]
    span: Span


# ---- schedules and model rules ------------------------------------------------------------


@dataclass(frozen=True)
class Directive:
    """One schedule directive: its verb and its operands (names and integers) in order."""

    verb: str
    loops: tuple[Name, ...]
    factor: int | None
    span: Span
    target: str | None = None
    factor_span: Span | None = None


@dataclass(frozen=True)
class ScheduleDecl:
    kernel: Name
    target: Name
    directives: tuple[Directive, ...]
    span: Span


@dataclass(frozen=True)
class Rule:
    """``linear "GLOB" use KERNEL [with FORMAT] [sparsity S] [prune METHOD] [fuse "GLOB"] [dtype T [A]]``:
    ``prune`` names the pruning method; ``fuse`` the module (an activation after the layer) that the
    kernel's epilogue replaces; ``dtype`` the type of the stored values (int8, bf16: a quantized layer)
    and ``activations`` how an int8 layer's inputs are scaled (``static``, calibrated, or ``dynamic``)."""

    pattern: str
    kernel: Name
    format: FormatRef | None
    sparsity: float | None
    span: Span
    sparsity_span: Span | None = None
    fuse: str | None = None
    prune: Name | None = None
    dtype: Name | None = None
    activations: Name | None = None


@dataclass(frozen=True)
class AttentionRule:
    """``attention "GLOB" [with FORMAT window N]``: the attention modules matching GLOB run
    nn.sdsl's attention kernel; with a format, its block-sparse one, on the blocks of FORMAT that
    hold a query and a key at most N tokens apart."""

    pattern: str
    format: FormatRef | None
    window: int | None
    span: Span
    window_span: Span | None = None


@dataclass(frozen=True)
class ModelDecl:
    name: Name
    rules: tuple[Rule, ...]
    span: Span
    attention: tuple[AttentionRule, ...] = ()


Decl = FormatDecl | KernelDecl | ScheduleDecl | ModelDecl


@dataclass(frozen=True)
class Module:
    """A whole .sdsl file."""

    decls: tuple[Decl, ...]
